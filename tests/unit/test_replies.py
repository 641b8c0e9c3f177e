"""ReplyQueue: what a client is owed, in order, and the state replies change. Plain bytes
in, plain bytes out; no sockets, no loop."""

from __future__ import annotations

from proxy.replies import (
    EXEC,
    FILTER,
    LOCAL,
    MONITOR,
    REPLACE,
    RESET,
    SILENT,
    SUB,
    ReplyQueue,
)
from proxy.resp import canned
from proxy.resp.reply import PUSH, REPLY, SUB_CONFIRM, SubConfirm

DOLLAR, MINUS, STAR, PLUS = ord("$"), ord("-"), ord("*"), ord("+")


def answer(queue: ReplyQueue, chunk: bytes, kind: int = REPLY,
           confirm: SubConfirm | None = None, whole: bool = True) -> tuple[bool, list[bytes]]:
    out: list[bytes] = []
    done = queue.answer(kind, confirm, chunk, whole, chunk[0], out)
    return done, out


def owe(queue: ReplyQueue, n: int = 1) -> list[list[int]]:
    slots = []
    for _ in range(n):
        slot = [0, 0, 0]
        queue.plain(slot)
        slots.append(slot)
    queue.in_flight += n
    return slots


def test_a_local_reply_with_nothing_owed_goes_at_once() -> None:
    queue = ReplyQueue()
    assert queue.local(b"+OK\r\n") == b"+OK\r\n"
    assert not queue.entries


def test_a_local_reply_waits_behind_an_owed_one_then_follows_it() -> None:
    queue = ReplyQueue()
    (slot,) = owe(queue)
    assert queue.local(b"-NOPERM x\r\n") == b""
    done, out = answer(queue, b"$1\r\nv\r\n")
    assert done and out == [b"$1\r\nv\r\n", b"-NOPERM x\r\n"]
    assert slot == [1, 0, 0] and not queue.entries and queue.in_flight == 0


def test_an_error_reply_counts_as_an_error() -> None:
    queue = ReplyQueue()
    (slot,) = owe(queue)
    answer(queue, b"-WRONGTYPE nope\r\n")
    assert slot == [0, 1, 0]


def test_plain_entries_are_shared_per_command_and_allocate_nothing() -> None:
    queue = ReplyQueue()
    slot = [0, 0, 0]
    assert queue.plain(slot) is queue.plain(slot)


def test_client_reply_off_silences_replies_and_local_ones() -> None:
    queue = ReplyQueue()
    queue.silence = 1
    slot = [0, 0, 0]
    entry = queue.plain(slot)
    assert entry.kind == SILENT
    queue.in_flight = 1
    assert queue.local(b"+OK\r\n") == b""
    done, out = answer(queue, b"+OK\r\n")
    assert done and out == [] and slot == [1, 0, 0]  # counted, not shown


def test_client_reply_skip_silences_only_the_next_command() -> None:
    queue = ReplyQueue()
    queue.silence = 2
    assert queue.plain([0, 0, 0]).kind == SILENT
    assert queue.silence == 0
    assert queue.plain([0, 0, 0]).kind != SILENT


def test_filter_rewrites_the_whole_reply_but_not_an_error() -> None:
    queue = ReplyQueue()
    queue.special(FILTER, [0, 0, 0], filter=lambda raw: b"*0\r\n")
    queue.in_flight = 2
    done, out = answer(queue, b"*1\r\n$6\r\nsecret\r\n")
    assert done and out == [b"*0\r\n"]
    queue.special(FILTER, [0, 0, 0], filter=lambda raw: b"*0\r\n")
    done, out = answer(queue, b"-ERR x\r\n")
    assert out == [b"-ERR x\r\n"]


def test_replace_sends_its_own_reply_unless_redis_failed() -> None:
    queue = ReplyQueue()
    queue.special(REPLACE, [0, 0, 0], data=canned.EXECABORT)
    queue.special(REPLACE, [0, 0, 0], data=canned.EXECABORT)
    queue.in_flight = 2
    assert answer(queue, b"+OK\r\n")[1] == [canned.EXECABORT]
    assert answer(queue, canned.BACKEND_UNAVAILABLE)[1] == [canned.BACKEND_UNAVAILABLE]


def test_subscribe_is_answered_by_one_confirmation_per_channel() -> None:
    queue = ReplyQueue()
    queue.special(SUB, [0, 0, 0], remaining=2, sub_kind="channels")
    queue.in_flight = 1
    assert queue.pubsub  # the first confirmation may come as a push
    first = SubConfirm(b"subscribe", b"a", 1)
    done, out = answer(queue, b"*3\r\n...", SUB_CONFIRM, first)
    assert not done and out == [b"*3\r\n..."]
    done, _ = answer(queue, b"*3\r\n...", SUB_CONFIRM, SubConfirm(b"subscribe", b"b", 2))
    assert done and queue.subs["channels"] == {b"a", b"b"} and queue.subscribed


def test_unsubscribe_without_arguments_counts_current_subscriptions() -> None:
    queue = ReplyQueue()
    queue.subs["patterns"] = {b"a*", b"b*"}
    queue.special(SUB, [0, 0, 0], remaining=-1, sub_kind="patterns")
    queue.in_flight = 1
    assert not answer(queue, b"*3", SUB_CONFIRM, SubConfirm(b"punsubscribe", b"a*", 1))[0]
    assert answer(queue, b"*3", SUB_CONFIRM, SubConfirm(b"punsubscribe", b"b*", 0))[0]
    assert not queue.subscribed


def test_pushes_and_monitor_lines_answer_nothing() -> None:
    queue = ReplyQueue()
    out: list[bytes] = []
    assert queue.push(PUSH, None, b">3\r\n...", out) and out == [b">3\r\n..."]
    assert not queue.push(REPLY, None, b"+OK\r\n", out)
    queue.special(MONITOR, [0, 0, 0])
    queue.in_flight = 1
    answer(queue, b"+OK\r\n")
    assert queue.monitor
    assert queue.push(REPLY, None, b"+1700000000.1 [0 1.2.3.4:5] \"get\"\r\n", out)


def test_reset_clears_state_when_redis_confirms() -> None:
    queue = ReplyQueue()
    queue.proto, queue.db, queue.monitor = 3, 4, True
    queue.subs["channels"].add(b"c")
    queue.special(RESET, [0, 0, 0], arg=2)  # the role's starting db
    queue.in_flight = 1
    answer(queue, b"+RESET\r\n")
    assert (queue.proto, queue.db, queue.monitor, queue.subscribed) == (2, 2, False, False)


def test_exec_keeps_its_select_only_if_the_transaction_ran() -> None:
    for reply, db in ((b"*1\r\n+OK\r\n", 5), (b"*-1\r\n", 1), (b"_\r\n", 1),
                      (b"-EXECABORT x\r\n", 1)):
        queue = ReplyQueue()
        queue.db = 5  # optimistic: the SELECT queued in the transaction
        queue.special(EXEC, [0, 0, 0], arg=5, data=b"1")
        queue.in_flight = 1
        answer(queue, reply)
        assert queue.db == db, reply


def test_fail_all_answers_every_owed_entry_in_order() -> None:
    queue = ReplyQueue()
    (slot,) = owe(queue)
    queue.local(b"-NOPERM x\r\n")
    owe(queue)
    out: list[bytes] = []
    queue.fail_all(out)
    assert out == [canned.BACKEND_UNAVAILABLE, b"-NOPERM x\r\n", canned.BACKEND_UNAVAILABLE]
    assert slot == [0, 1, 0] and not queue.entries and queue.in_flight == 0


def test_release_sends_only_the_local_replies_at_the_head() -> None:
    queue = ReplyQueue()
    owe(queue)
    queue.entries.appendleft(queue.entries[0].__class__(queue, LOCAL, data=b"+a\r\n"))
    out: list[bytes] = []
    queue.release(out)
    assert out == [b"+a\r\n"] and len(queue.entries) == 1
