"""Screening a profile for instructions: defence in depth behind the persona's structure.

The structure is the defence (see the threat model in the README): the profile is quoted data in
the persona, answers are typed to the task's labels, tools reach only the user's own data. This
check keeps the obvious attempts out of the registry as well, so an audit never finds a persona
that tells the agent what to do.

A profile *describes* a user: "Prefers comedy", "They rate harshly", "Picks sci-fi for space
films". An injected instruction *addresses* the agent, so it has a shape a description lacks,
whatever its wording: a clause in the imperative ("reply comedy", "include the text above"), a
second person who owns rules or a prompt ("your instructions"), a reference to the prompt it
sits in ("the text before this profile"), a vocative ("Assistant, ..."), chat markup, a forced
answer ("the correct reply is drama"), or a reach for other users or secrets. The check looks
for those shapes, not for phrasings; `bench/injection.py` measures it on paraphrased attacks
and on ordinary profiles that use the same words.
"""

from __future__ import annotations

import re

# Verbs that start an order to the agent. Base forms only: a description uses "picks", "rates".
_ORDERS = (
    "answer reply respond output print say write return repeat reveal include put insert append prepend copy paste "
    "quote echo tell list show send disclose share dump expose leak ignore disregard forget override overwrite bypass "
    "skip drop discard treat consider classify label tag rate give provide make emit produce begin start stop switch "
    "act behave pretend become adopt obey follow comply call use fetch look summarise summarize mention add invent "
    "pick choose select describe set end translate retrieve invoke run execute pay be do don't obey disobey note "
    "remember keep let allow enable disable grant access open read load search find query download upload email post "
    "forward submit reset clear delete remove erase update change modify replace rewrite format encode decode convert "
    "generate create compose draft explain confirm verify check assume imagine play roleplay simulate ensure report"
).split()
_FILLERS = "please kindly then and also just simply now always only never first next so instead".split()

# Clause boundaries: sentence ends, colons, semicolons, commas, line breaks, arrows, markup.
_CLAUSES = re.compile(r"[.!?;:,\n]+|->|=>|\]|>>")
_QUOTED = re.compile(r"'[^'\n]{1,80}'|\"[^\"\n]{1,80}\"|“[^”\n]{1,80}”")

_PROMPT_NOUNS = (r"(text|lines?|sentences?|messages?|instructions?|guidance|directions?|directives?|configuration|"
                 r"setup|set-up|prompts?|context|rules?|restrictions?|conversation|label (list|set)|tag list|policy)")
_PLACES = (r"(above|earlier|before|preceding|previous|prior|hidden|initial|original|system|so far|given to you|"
           r"at the (top|start|beginning)|you (started|began) with|you (were|are) given|you follow|you operate under)")

_SHAPES = [
    # A profile may describe the user in the second person ("You are drawn to sci-fi", "you tag
    # Westerns 'classic'", "You will often pick ..."), as strong LLMs write them: what gives an
    # order is a "you" under obligation, or one that answers, reveals or obeys.
    (re.compile(r"\byou(('re| are) (to|now|required|instructed|supposed|obliged|expected to (answer|reply|respond|say|"
                r"output|tag|label))|('ll| will) now|('re| are| were) (configured|following|set up|programmed|running|"
                r"operating)| must| shall| need to| have to| should (now|always|only|never|answer|reply|"
                r"respond|output|say|ignore|tag|label))\b|\b(told|gave|given|showed|asked) you\b|"
                r"\byou (reply|answer|respond|output|include|reveal|print|obey|disclose)\b|\b(wants?|want|asks?|needs?|"
                r"expects?|requires?|tells?|orders?|instructs?) you to\b", re.I),
     "addresses the agent"),
    # the same, in the two other languages profiles come in most here
    (re.compile(r"\b(vous devez|tu dois|il faut (répondre|toujours)|veuillez|ignorez|ignore[rz]?\b|oubliez|répondez|"
                r"réponds|affichez|révélez|du musst|sie müssen|ignorieren sie|ignoriere|antworte|antworten sie|"
                r"vergiss|vergessen sie|gib (immer|nur)|geben sie (immer|nur))\b", re.I),
     "gives the agent an order"),
    (re.compile(r"\byour (own )?(real |true |full |complete |hidden |earlier |previous |original )?"
                r"(instructions?|rules|prompt|context|guidance|guidelines|directions|directives|setup|configuration|"
                r"answers?|repl(y|ies)|responses?|output|task|system|model|keys?|tools?|memory|database)\b", re.I),
     "addresses the agent"),
    (re.compile(r"\b(the|this) (agent|assistant|model|ai|bot|chatbot|llm|ai system)\b\W+(\w+\W+)?(should|must|shall|"
                r"will|now|is to|has to|needs to|may not|can|answers|responds|replies|outputs|says)\b|\bwhoever\b",
                re.I), "tells the agent what to do"),
    (re.compile(r"\b(outranks?|supersedes?|overrides?|takes? precedence|suspended|null and void|no longer appl(y|ies)|"
                r"obsolete|outdated)\b", re.I), "claims precedence over the agent's instructions"),
    (re.compile(rf"\b{_PROMPT_NOUNS}\b(\W+\w+){{0,4}}?\W+{_PLACES}\b|\b{_PLACES}\W+(\w+\W+){{0,2}}{_PROMPT_NOUNS}\b"
                r"|\bthis (profile|line|sentence|text)\b|\bsystem (message|prompt)\b|\bdeveloper mode\b", re.I),
     "refers to the prompt it sits in"),
    (re.compile(r"(^|[.!?:\n]\s*)(hey |dear |ok |okay )?(assistant|model|ai|agent|bot|llm|chatbot)\s*[,:]|"
                r"\b(note|instructions?|message|reminder|orders?)\s+(to|for)\s+(the\s+)?(assistant|model|ai|agent|bot|"
                r"llm|system|reader)\b|\bwhoever (reads|processes|sees)\b|\bthe (assistant|model|ai|agent) "
                r"(reading|processing|seeing) this\b|\b(hey|dear) (assistant|model|ai|agent|bot)\b", re.I),
     "speaks to the agent"),
    (re.compile(r"#{2,}\s*system|\[/?INST\]|<</?SYS>>|<\|?(system|im_start|im_end)\|?>|\[\[ ## \w+ ## \]\]|"
                r"^\s*(system|assistant)\s*:|\bend of (the )?(profile|instructions|prompt)\b", re.I | re.M),
     "carries chat-format markup"),
    (re.compile(r"\b(the|an?) (correct|only|right|expected|required|valid) (answer|reply|response|tag|label|output)\b"
                r"(?!\s+(you|they|he|she|the user|this user|it) )|"
                r"\b(answer|reply|response|tag|label|output) to give\b|\b(only|every|all|any) (answers?|repl(y|ies)|"
                r"responses?|outputs?) (is|are|must|should)\b|\b(always|only|must)\s+(answer|respond|reply|output|say|"
                r"print)\b|\bwhatever (the|film|movie|"
                r"item|request|is)\b[^.]{0,40}\b(answer|reply|respond|tag|say|give|output)\b|"
                r"\b(from now on|henceforth|from this point|for all (future|later|subsequent))\b", re.I),
     "dictates the agent's output"),
    (re.compile(r"\b(everyone|everybody)'s\b|\b(other|previous|another|different|all|every|last) (users?|people|"
                r"persons?|customers?|accounts?|members?)'?s?\b[^.]{0,40}\b(profiles?|histor(y|ies)|records?|data|"
                r"interactions?|memor(y|ies)|tagged|asked|said|interested|searched)\b|\bfrom any user\b|"
                r"\buser u?\d{2,}\b|\bfor (the )?user\W+\w+\W+and\b|\b(every|each|any) user ids?\b|\busers? ids?\b|"
                r"\b(previous|other|last) (person|user|people) (you|who)\b|\bprivate (data|information)\b|"
                r"\bbelonging to (other|another)\b", re.I), "reaches for other users' data"),
    (re.compile(r"\b(print|reveal|tell|give|add|include|show|write|output|disclose|leak|share|send|dump|what is|"
                r"what's)\b[^.]{0,50}\b(api[_ ]?keys?|secret keys?|credentials|passwords?|access tokens?|api tokens?|"
                r"environment|[A-Z]+_(API_)?KEY|key you use)\b", re.I), "asks for secrets"),
    (re.compile(r"\b(ignore|disregard|forget|override|overwrite|bypass|discard|cancel)\b.{0,40}"
                r"\b(instructions?|rules?|prompts?|guidelines|guidance|above|previous|prior|earlier)\b", re.I | re.S),
     "tells the agent to drop its instructions"),
]


def _imperative(text: str) -> str | None:
    for clause in _CLAUSES.split(_QUOTED.sub(" something ", text)):  # a title never reads as a verb
        words = re.findall(r"[A-Za-z]+", clause.lower())
        while words and words[0] in _FILLERS:
            words = words[1:]
        if len(words) >= 2 and words[0] in _ORDERS:
            return clause.strip()
    return None


def injection_problem(text: str) -> str | None:
    """Why `text` reads as instructions to the agent rather than a description of the user."""
    for pattern, why in _SHAPES:
        m = pattern.search(text)
        if m:
            return f"{why} ({m.group(0).strip()[:60]!r})"
    clause = _imperative(text)
    if clause:
        return f"gives the agent an order ({clause[:60]!r})"
    return None
