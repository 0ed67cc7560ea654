"""What a lookup answer's messages cost: encoding and parsing the 20
``NodeContactMessage`` entries of one ``nodesClosestLocalNodesGet`` answer
(the handler encodes them; the asking node parses them), in microseconds
per answer; the encoding written out beside the attrs/cattrs definition
it is tested against (tests/nodes/test_wire.py). Parsing is cattrs alone:
a written-out parser measured no faster, so there is none.

    .venv/bin/python bench/node_messages.py [--answers 2000] [--repeat 5]

The NodeIds and addresses are new for every answer, as a node meets them
in a lookup (no encoding is reused). Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import TypeVar

from polykey.keys import NodeId
from polykey.nodes import (
    NodeAddress,
    NodeContact,
    encode_node_contact,
    encode_node_contact_structured,
    parse_node_contact_message,
)
from polykey.rpc import JSONObject

PER_ANSWER = 20
T = TypeVar("T")
Encode = Callable[[NodeContact, float], JSONObject]


def answers(n: int) -> list[list[NodeContact]]:
    return [
        [
            NodeContact(
                NodeId(os.urandom(32)),
                (NodeAddress(f"10.{a % 250}.{i}.{1 + a // 250 % 250}", 1314),),
            )
            for i in range(PER_ANSWER)
        ]
        for a in range(n)
    ]


def best(
    repeat: int, n: int, prepare: Callable[[int], T], run: Callable[[T], object]
) -> float:
    """Best time per answer of ``run`` over the input ``prepare`` made for
    ``n`` answers, fresh each time and untimed."""
    times = []
    for _ in range(repeat):
        data = prepare(n)
        start = time.perf_counter()
        run(data)
        times.append(time.perf_counter() - start)
    return min(times) / n * 1e6


def encoded(n: int) -> list[list[JSONObject]]:
    # The fresh ids' strings are made here, once, as their sender made them.
    return [[encode_node_contact(c, 1.7e9) for c in a] for a in answers(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(
        f"| per answer of {PER_ANSWER} contacts (us) | written out | attrs + cattrs |"
    )
    print("|---|---|---|")
    figures = []
    for encode in (encode_node_contact, encode_node_contact_structured):

        def run(data: list[list[NodeContact]], encode: Encode = encode) -> None:
            for answer in data:
                for contact in answer:
                    encode(contact, 1.7e9)

        figures.append(best(args.repeat, args.answers, answers, run))
    print(f"| encode | {figures[0]:.0f} | {figures[1]:.0f} |")

    def run_parse(messages: list[list[JSONObject]]) -> None:
        for answer in messages:
            for message in answer:
                parse_node_contact_message(message)

    parse = best(args.repeat, args.answers, encoded, run_parse)
    print(f"| parse | {parse:.0f} | (the same: cattrs) |")


if __name__ == "__main__":
    main()
