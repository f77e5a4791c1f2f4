import dspy


class FormulateMemoryQuery(dspy.Signature):
    """Write a short keyword query that finds the user's past interactions most useful for
    answering this request: the item's distinctive words, not the task instructions."""

    query: str = dspy.InputField()
    search_query: str = dspy.OutputField(desc="a few keywords")
