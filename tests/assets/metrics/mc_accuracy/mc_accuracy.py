"""Accuracy of multiple-choice predictions: a local `evaluate` metric, so the tests need no Hub."""

import datasets
import evaluate


class McAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="The fraction of predictions equal to their reference (the index of the right choice).",
            citation="", inputs_description="predictions, references: lists of choice indices",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}
