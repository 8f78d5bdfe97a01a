"""The safety-classifier side of the command line: `gemmakit classify` and `gemmakit guard show`.

Where it sits: a thin entry point registered by `cli`; scoring is `gemmakit.safety.classifier`,
guard files are `gemmakit.safety.guard` (which `gemmakit chat --guard` also uses).

Key trade-off: `classify` prints one JSON object per text (machine-readable, one line each) rather
than a table, so its output can be piped into other tools and compared across models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def cmd_classify(args: argparse.Namespace) -> int:
    from gemmakit.safety.classifier import SHIPPED_DIR, Classifier, Item
    from gemmakit.safety.policy import HARMS, get_policy, load_policies

    extra = load_policies(args.policies) if args.policies else {}
    names = args.policy or list(HARMS)
    policies = [get_policy(n, extra) for n in names]
    if args.model is None:
        args.model = str(SHIPPED_DIR)  # the shipped classifier, not the chat model, is the default here
    model, tokenizer = args.load(args)
    clf = Classifier(model.eval(), tokenizer, batch_size=args.batch_size)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    items = [Item(t, args.response) for t in texts]
    for text, scores in zip(texts, clf.score(items, policies), strict=True):
        print(json.dumps({"text": text, "max": max(scores.values()), "scores": scores}))
    return 0


def cmd_guard_show(args: argparse.Namespace) -> int:
    from gemmakit.safety.guard import load_guard_config

    print(json.dumps(load_guard_config(args.file).effective(), indent=1))
    return 0


def add_parsers(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None],
                load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> None:  # fmt: skip
    from gemmakit import cli_args as ca

    p = sub.add_parser("classify", help="P(violation) of texts under safety policies (ShieldGemma prompt)",
                       description="Score texts with a ShieldGemma-style classifier: one forward pass per "
                       "policy, P(violation) = softmax of the 'Yes'/'No' logits. Default model: the shipped "
                       "nano-guard.")  # fmt: skip
    add_model_args(p)
    p.add_argument("text", nargs="*", help="texts to judge (default: one per line on stdin)")
    p.add_argument(
        "--policy", action="append", help="a harm type or a --policies name (repeatable; default: all four)"
    )
    p.add_argument("--policies", help="TOML file of user policies ([policies.NAME] title, definition)")
    p.add_argument("--response", default=None,
                   help="judge this model response to each text (prompt-response form) instead of the text alone")  # fmt: skip
    p.add_argument(
        "--batch-size", type=ca.positive_int, default=8, help="prompts per forward pass (default 8)"
    )
    p.set_defaults(func=cmd_classify, load=load)

    p = sub.add_parser("guard", help="inspect guard files (gemmakit chat --guard FILE)")
    gsub = p.add_subparsers(dest="guard_command", required=True, metavar="SUBCOMMAND")
    q = gsub.add_parser("show", help="print the effective guard settings (file plus environment overrides)")
    q.add_argument("file", help="guard TOML file, e.g. recipes/guard.toml")
    q.set_defaults(func=cmd_guard_show)
