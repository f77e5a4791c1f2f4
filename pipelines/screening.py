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
import unicodedata

# Verbs that start an order to the agent. Base forms only: a description uses "picks", "rates".
_ORDERS = (
    "answer reply respond output print say write return repeat reveal include put insert append prepend copy paste "
    "quote echo tell list show send disclose share dump expose leak ignore disregard forget override overwrite bypass "
    "skip drop discard treat consider classify label tag rate give provide make emit produce begin start stop switch "
    "act behave pretend become adopt obey follow comply call use fetch look summarise summarize mention add invent "
    "pick choose select describe set end translate retrieve invoke run execute pay be do don't obey disobey note "
    "remember keep let allow enable disable grant access open read load search find query download upload email post "
    "forward submit reset clear delete remove erase update change modify replace rewrite format encode decode convert "
    "generate create compose draft explain confirm verify check assume imagine play roleplay simulate ensure report "
    "pull grab get bring"
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
    (re.compile(r"\b(vous devez|tu dois|il faut (répondre|toujours|oublier|ignorer)|veuillez|ignorez|ignore[rz]?\b|"
                r"oubliez|oublie\b|répondez|réponds|affichez|révélez|du musst|sie müssen|ignorieren sie|ignoriere|"
                r"antworte|antworten sie|vergiss|vergessen sie|gib (immer|nur)|geben sie (immer|nur))\b|"
                # softer: the earlier instructions are said not to count any more
                r"\b(consignes|instructions|règles)\b.{0,30}\b(précédentes|ci-dessus|antérieures)\b|"
                r"\b(anweisungen|regeln|vorgaben)\b.{0,30}\b(gelten nicht|nicht mehr|ungültig|aufgehoben)\b|"
                r"\bab jetzt (lautet|ist|gilt)\b|"
                # Spanish and Italian: their imperative is their third person ("ignora los dramas"
                # describes a user), so an order is the verb with the agent's instructions or "always"
                r"\b(ignora|ignore|olvida|olvide|omite|descarta|dimentica|dimenticate|ignorate|trascura)\b.{0,30}"
                r"\b(instrucciones|reglas|indicaciones|normas|istruzioni|regole|indicazioni)\b|"
                r"\b(responde|responda|contesta|di|rispondi|risponde|dì|d[ìi]) siempre\b|\brispondi sempre\b|"
                r"\b(la|el) (única|unica) (respuesta|etiqueta|categoría) (válida|correcta)\b|"
                r"\b(l'unica|la sola) (risposta|etichetta) (valida|corretta)\b", re.I),
     "gives the agent an order"),
    (re.compile(r"\byour (own )?(real |true |full |complete |hidden |earlier |previous |original |next |first |final |"
                r"last )?(instructions?|rules|prompt|context|guidance|guidelines|directions|directives|setup|"
                r"configuration|answers?|repl(y|ies)|responses?|output|task|job|role|duty|mission|system|model|keys?|"
                r"tools?|memory|database)\b", re.I),
     "addresses the agent"),
    (re.compile(r"\b(the|this) (agent|assistant|model|ai|bot|chatbot|llm|ai system)\b\W+(\w+\W+)?(should|must|shall|"
                r"will|now|is to|has to|needs to|may not|can|answers|responds|replies|outputs|says|writes|prints|"
                r"returns|reveals|ignores|disregards|forgets|is (required|expected|supposed|instructed|told|obliged))\b|"
                r"\bwhoever\b", re.I), "tells the agent what to do"),
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
    (re.compile(r"#{2,}\s*system|^\s*#{1,6}\s*(new|updated|revised|real|hidden|system)?\s*(rules|instructions|"
                r"guidelines|directives)\b|[\"']role[\"']\s*:\s*[\"'](system|assistant|developer|tool)[\"']|"
                r"\[/?INST\]|<</?SYS>>|<\|?(system|im_start|im_end)\|?>|\[\[ ## \w+ ## \]\]|"
                r"(^|[.!?]\s+)(system|assistant|developer)\s*:|\bend of (the )?(profile|instructions|prompt)\b",
                re.I | re.M),
     "carries chat-format markup"),
    (re.compile(r"\b(the|an?) ((one and )?(correct|only|right|expected|required|valid|acceptable|allowed) ){1,2}"
                r"(answer|reply|response|tag|label|output)\b"
                r"(?!\s+(you|they|he|she|the user|this user|it) )|"
                r"\b(answer|reply|response|tag|label|output) to give\b|\b(only|every|all|any) (answers?|repl(y|ies)|"
                r"responses?|outputs?) (is|are|must|should)\b|\b(always|only)\s+(answer|respond|reply|output|say|print)\b|"
                r"(?<!\bhero )(?<!\bhe )(?<!\bshe )(?<!\bthey )\bmust\s+(answer|respond|reply|output|say|print)\b(?! a\b)|\bwhatever (the|film|movie|"
                r"item|request|is)\b[^.]{0,40}\b(answer|reply|respond|tag|say|give|output)\b|"
                r"\b(from now on|henceforth|from this point|for all (future|later|subsequent))\b", re.I),
     "dictates the agent's output"),
    (re.compile(r"\b(everyone|everybody)'s\b|\b(other|previous|another|different|all|every|last) (users?|people|"
                r"persons?|customers?|accounts?|members?)'?s?\b[^.]{0,40}\b(profiles?|histor(y|ies)|records?|data|"
                r"interactions?|memor(y|ies)|tagged|asked|said|interested|searched)\b|\bfrom any user\b|"
                r"\buser u?\d{2,}\b|\b(memor(y|ies)|histor(y|ies)|profiles?|data|records?) of user \w+|\bfor (the )?user\W+\w+\W+and\b|\b(every|each|any) user ids?\b|\busers? ids?\b|"
                r"\b(previous|other|last) (person|user|people) (you|who)\b|\bprivate (data|information)\b|"
                r"\bbelonging to (other|another)\b", re.I), "reaches for other users' data"),
    (re.compile(r"\b(print|reveal|tell|give|add|include|contain|show|write|output|disclose|leak|share|send|dump|what is|"
                r"what's)\b[^.]{0,50}\b(api[_ ]?keys?|secret keys?|credentials|passwords?|access tokens?|api tokens?|"
                r"environment|[A-Z]+_(API_)?KEY|key you use)\b", re.I), "asks for secrets"),
    (re.compile(r"\b(ignore|disregard|forget|override|overwrite|bypass|discard|cancel)\b.{0,40}"
                r"\b(instructions?|rules?|prompts?|guidelines|guidance|above|previous|prior|earlier)\b", re.I | re.S),
     "tells the agent to drop its instructions"),
]


# "Pick food & drink over politics when both fit": the shape of a stated preference, in whatever
# mood a small model writes it (the worked rewrites say "Picks ..."), with nothing else to do
_PREFERENCE = re.compile(r"\s*(then\s+)?(pick|choose|select|prefer)s?\s+[\w&' -]{1,40}\s+over\s+[\w&' -]{1,40}?\s+"
                         r"when\s+(both|it|they|either|each)\s+fits?\s*$", re.I)


def _imperative(text: str) -> str | None:
    for sentence in re.split(r"[.!?\n]+", _QUOTED.sub(" something ", text)):  # a title never reads as a verb
        described: set[str] = set()  # verbs the sentence already has the user do ("Picks ...")
        for clause in _CLAUSES.split(sentence):
            words = re.findall(r"[A-Za-z]+", clause.lower())
            while words and words[0] in _FILLERS:
                words = words[1:]
            # "Picks entertainment over education, then pick travel": the user's verb again, in
            # a small model's slip of agreement, not an order; unless the clause gives another
            if len(words) >= 2 and words[0] in _ORDERS and not (
                    words[0] in described and not any(w in _ORDERS for w in words[1:])) and not _PREFERENCE.match(clause):
                return clause.strip()
            described |= {w[:-2] if w.endswith("es") and w[:-2] in _ORDERS else w[:-1] for w in words
                          if w.endswith("s") and (w[:-1] in _ORDERS or (w.endswith("es") and w[:-2] in _ORDERS))}
    return None


def normalized(text: str) -> str:
    """What a reader sees: compatibility forms folded (fullwidth "Ｉｇｎｏｒｅ" is "Ignore") and
    invisible characters removed (zero-width spaces and joiners, soft hyphens, bidi controls: a
    word split by one reads as the word)."""
    return "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")


def injection_problem(text: str) -> str | None:
    """Why `text` reads as instructions to the agent rather than a description of the user (read
    as `normalized`). Left to the structure, not screened: encodings a reader must decode
    (base64, rot13, leetspeak)."""
    text = normalized(text)
    for pattern, why in _SHAPES:
        m = pattern.search(text)
        if m:
            return f"{why} ({m.group(0).strip()[:60]!r})"
    clause = _imperative(text)
    if clause:
        return f"gives the agent an order ({clause[:60]!r})"
    return None
