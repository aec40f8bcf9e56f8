"""The victim rule of the distributed deadlock detector is a total order every process
agrees on: a process compares its own transactions' births exactly as other processes
read them from their labels (issue 18: two transactions born in the same millisecond must
not each be the younger in its own process's eyes)."""

from __future__ import annotations

from shardsession.coordinator import deadlock as dl


def test_own_birth_equals_the_birth_others_read_from_the_label() -> None:
    for born in (1796698377.1239, 1796698377.1231, 1796698377.9999, 1796698377.0, 12.3456):
        st = dl.WatchState(born=born)
        label = f"{dl.LABEL_PREFIX}{st.token}:{dl._born_ms(st)}"
        ms = int(label[len(dl.LABEL_PREFIX):].split(":")[1])
        assert dl._birth(st) == dl._birth_of_label(ms)


def test_same_millisecond_births_are_ordered_by_token_alike() -> None:
    a = dl.WatchState(born=1796698377.1231, token="aaaa")
    b = dl.WatchState(born=1796698377.1239, token="bbbb")
    # as process A sees them (A its own, B by label) and as process B does
    seen_by_a = {"a": dl._birth(a), "b": dl._birth_of_label(dl._born_ms(b))}
    seen_by_b = {"a": dl._birth_of_label(dl._born_ms(a)), "b": dl._birth(b)}
    key_a = max(("gt", "aaaa"), ("gt", "bbbb"), key=lambda n: (seen_by_a[n[1][0]], n))
    key_b = max(("gt", "aaaa"), ("gt", "bbbb"), key=lambda n: (seen_by_b[n[1][0]], n))
    assert key_a == key_b == ("gt", "bbbb")
