import pytest

from ftstudio.errors import IllegalTransition
from ftstudio.studio.task import FINAL, TRANSITIONS, TaskStatus, check_transition


def test_every_state_has_a_row_and_final_states_only_leave_by_retry_or_extend():
    assert set(TRANSITIONS) == set(TaskStatus)
    for final in FINAL:
        assert TRANSITIONS[final] == {TaskStatus.QUEUED}  # retry, or extend of a completed task


def test_every_state_is_reachable_from_queued():
    seen, todo = {TaskStatus.QUEUED}, [TaskStatus.QUEUED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(TaskStatus)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (TaskStatus.COMPLETED, TaskStatus.TRAINING),
        (TaskStatus.QUEUED, TaskStatus.TRAINING),
        (TaskStatus.CANCELLED, TaskStatus.TRAINING),
        (TaskStatus.TRAINING, TaskStatus.PREPARING),
    ],
)
def test_illegal_moves_raise(src, dst):
    with pytest.raises(IllegalTransition, match=f"from {src} to {dst}"):
        check_transition(src, dst)


def test_only_running_states_have_a_process():
    assert {s for s in TaskStatus if s.has_process} == {TaskStatus.PREPARING, TaskStatus.TRAINING}
    assert all(s.is_final for s in FINAL)
