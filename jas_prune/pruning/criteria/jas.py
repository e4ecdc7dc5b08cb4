"""``jas``: the Joint Attribution Score of each FFN neuron (the paper's criterion).

The importance of neuron j of block l is the mean over probe images of its layer-progressive
candidate score JAS(P ∪ {j}): from a run's saved class masks when the inputs name them
(class-specialised: the classes' TopK masks are protected), else located afresh on the loader.
"""

from __future__ import annotations

from . import CRITERIA, Criterion, CriterionScores, ScoringInputs


def jas_scores(inputs: ScoringInputs) -> CriterionScores:
    """JAS importance of ``inputs.masks`` (with protected masks), else of ``inputs.loader``."""
    from ..plugin import JASImportance

    if inputs.masks is not None:
        m = inputs.masks
        imp = JASImportance.from_run(m.run_dir, inputs.classes, aggregation=m.aggregation, digest=m.digest)
        return CriterionScores(imp.scores, imp.protect)
    imp = JASImportance.from_loader(inputs.model, inputs.require_loader("jas"), inputs.classes,
                                    device=inputs.device, max_batches=inputs.max_batches,
                                    **inputs.locate_settings)
    return CriterionScores(imp.scores)


@CRITERIA.register
def _jas_criterion() -> Criterion:
    return Criterion(
        name="jas", label="JAS", colour="#d62728", needs_data=True, score=jas_scores,
        summary="Joint Attribution Score: mean layer-progressive candidate score JAS(P ∪ {j}) over probe images",
    )
