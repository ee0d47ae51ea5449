"""ESM, the error-oriented scoring mechanism (docs/design.md section 4): pure scorer and Ray stage.

The pure core is :mod:`ttpa_ray.esm.scorer` (re-exported here); :mod:`ttpa_ray.esm.stage` is the
stateless Ray Data shell and the row and file forms behind ``ttpa score``.

    index = prepare_tools(tools)                      # once per tool list (SchemaError if unusable)
    reference = prepare_reference(bfcl_answer, alternatives=True, tools=index)
    result = score(model_text, reference, index)      # ESMResult(score, components, errors, matches)

References carry several acceptable values as :class:`Alternatives` (``optional``: may be left out);
a plain list value is one list. ``alternatives=True`` reads BFCL's possible answers (every argument a
list of acceptable values, ``""`` = may be left out, also in BFCL's ``{tool: {param: [...]}}`` form);
files mark such rows with ``reference_alternatives: true``.
"""

from __future__ import annotations

from ttpa_ray.esm.scorer import (
    CATEGORIES,
    COMPONENTS,
    DEFAULT_WEIGHTS,
    OMITTED,
    Alternatives,
    ESMResult,
    ESMWeights,
    ReferenceCall,
    SchemaError,
    ToolIndex,
    best_matching,
    prepare_reference,
    prepare_tools,
    score,
)

__all__ = [
    "CATEGORIES",
    "COMPONENTS",
    "DEFAULT_WEIGHTS",
    "OMITTED",
    "Alternatives",
    "ESMResult",
    "ESMWeights",
    "ReferenceCall",
    "SchemaError",
    "ToolIndex",
    "best_matching",
    "prepare_reference",
    "prepare_tools",
    "score",
]
