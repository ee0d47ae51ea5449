"""Data quality of reversed construction on the real default model: what the text gates reject, and
how the teacher's generation settings change it.

The same validation seeds (``run.seed`` 1 by default; ``make run`` builds from seed 0, and its held-out
dialogues and the BFCL questions are never used here) are built by one engine under each variant of
the reverse settings, in this process, with the pipeline's own builder (``ReverseBuilder``) and the
config of ``configs/local.yaml``:
  before     the config as shipped before issue 31's generation change (the question as JSON)
  can-you    the question written by the teacher cast as the user, begun by "Can you" (question_stem)
  i-need-to  the same, begun by "I need to"
For each: dialogues admitted, the share of seeds rejected for repetition (question, answer or an
argument), the share rejected by any text gate, every reason, and the admitted questions and answers,
written whole to ``--out`` (JSON lines) for reading.

    .venv/bin/python bench/quality.py [--quick] [--seeds N] [--seed S] [--variants a,b] [--model M]
        [--catalogue bfcl-simulated:GorillaFileSystem,TicketAPI]
Last line: ``repetition_rejected_share = <share of seeds, best variant>``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

VARIANTS: dict[str, list[str]] = {
    "before": ["reverse.question_stem=null"],
    "can-you": ["reverse.question_stem=Can you"],
    "i-need-to": ["reverse.question_stem=I need to"],
    # no restart rail: a teacher whose calls failed keeps its budget instead of giving up
    "can-you-no-restart": ["reverse.question_stem=Can you", "reverse.restart_after_failures=99"],
    # the answer in its own step as well (reverse.answer_stem)
    "stems": ["reverse.question_stem=Can you", "reverse.answer_stem=I found that"],
    "stems-no-restart": [
        "reverse.question_stem=Can you",
        "reverse.answer_stem=I found that",
        "reverse.restart_after_failures=99",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="16 seeds a variant (default 48)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1, help="run seed of the validation seeds (not 0)")
    parser.add_argument("--variants", default="before,can-you,i-need-to")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the teacher: a model name or tiny")
    parser.add_argument("--catalogue", default=None, help="reverse.catalogue (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ttpa-bench-quality.jsonl")
    args = parser.parse_args()
    count = args.seeds or (16 if args.quick else 48)
    names = [v for v in args.variants.split(",") if v]

    from ttpa_ray.config import load_config
    from ttpa_ray.engine import Engine
    from ttpa_ray.models import resolve_model
    from ttpa_ray.quality import DEGENERATE, REPETITIVE
    from ttpa_ray.reverse import ReverseBuilder, make_seeds
    from ttpa_ray.tools.registry import ToolRegistry, load_catalogue

    if args.model == "tiny":
        from ttpa_ray.tiny_model import ensure_tiny_model

        model = str(ensure_tiny_model(Path(tempfile.gettempdir()) / "ttpa-bench-tiny", seed=0))
    else:
        model = resolve_model(args.model)
    common = [f"reverse.num_seeds={count}"]
    if args.catalogue:
        common.append(f"reverse.catalogue={args.catalogue}")
    base = load_config(ROOT / "configs" / "local.yaml", common)
    engine = Engine(model, base.vllm, dtype=base.model.dtype, seed=args.seed)
    catalogue = load_catalogue(base.reverse.catalogue)
    seeds = make_seeds(catalogue, base.reverse, args.seed)
    results: dict[str, dict[str, Any]] = {}
    with args.out.open("w", encoding="utf-8") as out:
        for name in names:
            config = load_config(ROOT / "configs" / "local.yaml", [*common, *VARIANTS[name]])
            start = time.perf_counter()
            with ToolRegistry(catalogue) as registry:
                builder = ReverseBuilder(engine, registry, config.reverse, teacher=model)
                dialogues, rejected = builder.run(seeds)
            reasons = Counter(r.reason for r in rejected)
            errors = Counter(
                _error_kind(m["content"])
                for row in rejected
                for m in row.payload_object().get("teacher_messages", [])
                if m["role"] == "tool" and '"error"' in str(m["content"])
            )
            repetition = sum(reasons[r] for r in REPETITIVE) / len(seeds)
            degenerate = sum(reasons[r] for r in DEGENERATE) / len(seeds)
            results[name] = {"dialogues": len(dialogues), "repetition": repetition, "degenerate": degenerate}
            print(
                f"{name:>10}: {len(dialogues)}/{len(seeds)} admitted, repetition {repetition:.1%}, any text "
                f"gate {degenerate:.1%} of seeds ({time.perf_counter() - start:.0f} s); reasons "
                f"{dict(reasons.most_common())}",
                flush=True,
            )
            print(f"{'':>12}failed calls of the rejected seeds, by error: {dict(errors.most_common(8))}")
            raw = Counter(
                str(m["content"])[:70]
                for row in rejected
                for m in row.payload_object().get("teacher_messages", [])
                if m["role"] == "tool" and '"error"' in str(m["content"])
            )
            print(f"{'':>12}most common: {dict(raw.most_common(6))}")
            for dialogue in dialogues:
                out.write(json.dumps({"variant": name, **_readable(dialogue)}, ensure_ascii=False) + "\n")
                print(f"{'':>12}Q: {_readable(dialogue)['question'][:160]}")
                print(f"{'':>12}A: {_readable(dialogue)['answer'][:160]}")
            for row in rejected:
                payload = row.payload_object()
                if row.reason in DEGENERATE or row.reason == "answer_ungrounded":
                    out.write(
                        json.dumps(
                            {
                                "variant": name,
                                "rejected": row.reason,
                                "detail": row.detail,
                                **_texts(payload),
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
    engine.close()
    print(f"admitted and rejected texts: {args.out}")
    best = min(names[1:] or names, key=lambda n: (results[n]["repetition"], -results[n]["dialogues"]))
    if "before" in results:
        print(f"repetition_rejected_share_before = {results['before']['repetition']:.3f}")
    print(f"best variant: {best}")
    print(f"repetition_rejected_share = {results[best]['repetition']:.3f}")


def _readable(dialogue: Any) -> dict[str, Any]:
    messages = dialogue.messages
    calls = [
        f"{c.name}({json.dumps(c.arguments, ensure_ascii=False)})" for m in messages for c in m.tool_calls
    ]
    return {
        "seed_id": dialogue.seed_id,
        "scenario": dialogue.scenario,
        "question": messages[1].content or "",
        "calls": calls,
        "results": [(m.content or "")[:200] for m in messages if m.role == "tool"],
        "answer": messages[-1].content or "",
    }


def _error_kind(content: Any) -> str:
    """A tool error's message with its values cut: what kind of mistake the teacher made."""
    import re

    try:
        text = str(json.loads(content).get("error", content))
    except (ValueError, AttributeError):
        text = str(content)
    return re.sub(r"'[^']*'|\"[^\"]*\"|\d[\d.\-:]*", "_", text)[:60]


def _texts(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: payload.get(k) for k in ("scenario", "question", "answer")}


if __name__ == "__main__":
    main()
