"""Stage 5: Mask R-CNN and DeepLabV3 under each supervision in ``segmenters.supervisions``
(``full`` = GT masks, the upper bound; ``bbam`` = our pseudo labels; ``box`` = filled boxes).

``python -m flows.train_segmenters --params params.yaml``
"""

from __future__ import annotations

from prefect import flow

from flows.common import stage_cli
from tasks.segmenters import SEGMENTERS, train_segmenter


@flow(name="train-segmenters")
def train_segmenters_flow(params: dict) -> dict:
    models = {}
    for supervision in params["segmenters"]["supervisions"]:
        for kind in SEGMENTERS:  # instance, then semantic
            models[f"{kind}_{supervision}"] = train_segmenter(params, kind, supervision)
    print(f"[bbam] train_segmenters: {len(models)} models: {', '.join(models)}")
    return models


if __name__ == "__main__":
    stage_cli("train_segmenters", train_segmenters_flow)
