
import dspy

from persona_agent.data.tasks import Task


class TaskAnswer(dspy.Signature):
    """Answer the request as this user would."""

    query: str = dspy.InputField(desc="the request")
    memories: str = dspy.InputField(desc="the user's own related past interactions, as 'item -> their response'")
    answer: str = dspy.OutputField()


class PlainAnswer(dspy.Signature):
    """Answer the request."""

    query: str = dspy.InputField(desc="the request")
    answer: str = dspy.OutputField()


def typed_to(signature: type[dspy.Signature], task: Task, instructions: str) -> type[dspy.Signature]:
    """`signature` with its answer typed to the task's label set, under `instructions`."""
    return signature.with_updated_fields(
        "answer", type_=task.answer_type(), desc=f"exactly one of the labels ({task.description})"
    ).with_instructions(instructions)
