"""Threading for the archive: Jamie Zawinski's algorithm over References and In-Reply-To.

https://www.jwz.org/doc/threading.html, with two deliberate differences:

* the *thread key* of a message is the Message-ID of the topmost container of
  its tree, taken before empty containers are pruned.  For a reply that key is
  usually the first entry of its References, so the incremental archiver can
  compute the same key from one message and a few lookups, and replies that
  arrive before their parent land in the same thread;
* subject grouping is only a fallback: a root whose subject is a reply
  ("Re:", "Odp:", "AW:" ...) and that carries no References at all joins the
  latest earlier thread with the same normalised subject.

Duplicate Message-IDs keep the first message (the later one becomes a new
root under a derived id); messages without a Message-ID get one from the
caller.  Reference loops are refused when linking.  Nothing here does I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Node", "Threaded", "normalize_subject", "is_reply_subject", "thread_messages", "tree_order"]

_REPLY_PREFIX = re.compile(
    r"^\s*(?:(?:re|odp|aw|sv|vs|antw|fwd?|pd|przek)\s*(?:\[\d+\])?\s*[:：]\s*|\[[^\]]{1,40}\]\s*)",
    re.IGNORECASE,
)
_SPACES = re.compile(r"\s+")


@functools.lru_cache(maxsize=8192)  # a thread's replies repeat its subject
def normalize_subject(subject: str) -> str:
    """The subject without list tags and reply/forward prefixes, lower-cased."""
    text = subject
    while True:
        stripped = _REPLY_PREFIX.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    return _SPACES.sub(" ", text).strip().lower()


def is_reply_subject(subject: str) -> bool:
    text = re.sub(r"^\s*(\[[^\]]{1,40}\]\s*)+", "", subject)
    return bool(re.match(r"^\s*(re|odp|aw|sv|vs|antw)\s*(\[\d+\])?\s*[:：]", text, re.IGNORECASE))


@dataclass(frozen=True, slots=True)
class Node:
    """What threading needs to know about one message."""

    key: int  # the caller's handle (archive row id)
    message_id: str  # without angle brackets, never empty
    references: tuple[str, ...]  # References then In-Reply-To, oldest first, without brackets
    subject: str
    date: float


@dataclass(slots=True, eq=False)
class _Container:
    mid: str
    node: Node | None = None
    parent: _Container | None = None
    children: list[_Container] = field(default_factory=list)

    def has_descendant(self, other: _Container) -> bool:
        stack = list(self.children)
        seen = 0
        while stack:
            c = stack.pop()
            if c is other:
                return True
            seen += 1
            if seen > 100_000:  # a corrupt graph must not hang the build
                return True
            stack.extend(c.children)
        return False


def _link(parent: _Container, child: _Container) -> None:
    if child.parent is parent:
        return
    if child.parent is not None:
        child.parent.children.remove(child)
    child.parent = parent
    parent.children.append(child)


@dataclass(frozen=True, slots=True)
class Threaded:
    """One message placed in a thread: the thread key and its parent's Message-ID."""

    thread: str  # Message-ID of the thread's topmost container
    parent: str  # Message-ID of the nearest existing ancestor, or ""


def thread_messages(nodes: Iterable[Node]) -> dict[int, Threaded]:
    """Thread a whole list; return each node key's thread and parent."""
    table: dict[str, _Container] = {}
    order: list[_Container] = []
    for node in nodes:
        mid = node.message_id
        c = table.get(mid)
        if c is not None and c.node is not None:
            # A duplicate id: keep the first message, give this one its own container.
            n = 2
            while f"{mid}#dup{n}" in table:
                n += 1
            mid = f"{mid}#dup{n}"
            c = None
        if c is None:
            c = _Container(mid)
            table[mid] = c
        c.node = node
        order.append(c)
        prev: _Container | None = None
        for ref in node.references:
            if ref == node.message_id:
                continue
            rc = table.get(ref)
            if rc is None:
                rc = _Container(ref)
                table[ref] = rc
            if prev is not None and rc.parent is None and rc is not prev and not rc.has_descendant(prev):
                _link(prev, rc)
            prev = rc
        if prev is not None and prev is not c and not c.has_descendant(prev):
            _link(prev, c)
        elif prev is None and c.parent is not None and c.parent.node is None:
            pass  # an earlier reply put us under a dummy; the References of the reply win

    def top(c: _Container) -> _Container:
        depth = 0
        while c.parent is not None and depth < 100_000:
            c = c.parent
            depth += 1
        return c

    def nearest_real(c: _Container) -> str:
        p = c.parent
        while p is not None and p.node is None:
            p = p.parent
        return p.mid if p is not None else ""

    # Subject fallback: a root that is a reply by its subject but has no
    # References joins (with its whole tree) the latest earlier thread with
    # the same subject.
    def first_node(c: _Container) -> Node | None:
        stack, best = [c], None
        while stack:
            x = stack.pop()
            if x.node is not None and (best is None or (x.node.date, x.node.key) < (best.date, best.key)):
                best = x.node
            stack.extend(x.children)
        return best

    roots: list[tuple[Node, _Container]] = []
    for c in table.values():
        if c.parent is None:
            head = c.node or first_node(c)
            if head is not None:
                roots.append((head, c))
    by_subject: dict[str, str] = {}
    merged: dict[str, str] = {}
    for head, root in sorted(roots, key=lambda item: (item[0].date, item[0].key)):
        thread = root.mid
        subject = normalize_subject(head.subject)
        if root.node is head and not head.references and is_reply_subject(head.subject) and subject in by_subject:
            thread = by_subject[subject]
            merged[root.mid] = thread
        if subject and (subject not in by_subject or not is_reply_subject(head.subject)):
            by_subject.setdefault(subject, thread)
    result: dict[int, Threaded] = {}
    for c in order:
        assert c.node is not None
        top_mid = top(c).mid
        result[c.node.key] = Threaded(thread=merged.get(top_mid, top_mid), parent=nearest_real(c))
    return result


def tree_order(nodes: Sequence[Node]) -> list[tuple[Node, int, str]]:
    """The messages of one thread in reading order: (node, depth, parent Message-ID).

    Depth-first, siblings by date; a missing ancestor is skipped (its
    children move up), so depth counts only messages that exist.
    """
    ordered = sorted(nodes, key=lambda n: (n.date, n.key))
    by_id: dict[str, Node] = {}
    for n in ordered:
        by_id.setdefault(n.message_id, n)
    children: dict[str, list[Node]] = {}
    roots: list[Node] = []
    parent_of: dict[int, str] = {}
    for n in ordered:
        parent = ""
        if by_id.get(n.message_id) is n:
            for ref in reversed(n.references):
                if ref in by_id and ref != n.message_id:
                    parent = ref
                    break
        if parent and _would_loop(parent, n, by_id):
            parent = ""
        parent_of[n.key] = parent
        if parent:
            children.setdefault(parent, []).append(n)
        else:
            roots.append(n)
    out: list[tuple[Node, int, str]] = []
    seen: set[int] = set()
    stack: list[tuple[Node, int]] = [(r, 0) for r in reversed(roots)]
    while stack:
        n, depth = stack.pop()
        if n.key in seen:
            continue
        seen.add(n.key)
        out.append((n, depth, parent_of[n.key]))
        if by_id.get(n.message_id) is n:
            stack.extend((ch, depth + 1) for ch in reversed(children.get(n.message_id, [])))
    # Anything cut off by a loop still appears, at the top level.
    for n in ordered:
        if n.key not in seen:
            out.append((n, 0, ""))
            seen.add(n.key)
    return out


def _would_loop(parent: str, node: Node, by_id: dict[str, Node]) -> bool:
    """True if following parents up from ``parent`` reaches ``node`` again."""
    seen = {node.message_id}
    current = parent
    for _ in range(10_000):
        if current in seen:
            return True
        seen.add(current)
        p = by_id.get(current)
        if p is None:
            return False
        nxt = ""
        for ref in reversed(p.references):
            if ref in by_id and ref != p.message_id:
                nxt = ref
                break
        if not nxt:
            return False
        current = nxt
    return True
