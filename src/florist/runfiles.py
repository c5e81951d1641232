"""The names of the files in a run folder (and in a folder written by ``florist prepare``).

One place for each name, so that the writer and every reader agree::

    labels.txt  train.csv  eval.csv  skipped.csv      prepare: classes and the split
    model.safetensors  model.json                     the model (model.json written last)
    metrics.json  run.json                            what it scored, how to repeat it
    checkpoint.pt                                     finetune: an unfinished run's state
    eval_predictions.csv  report.html  tb/            what the report and TensorBoard show
    label_issues.csv                                  photos whose label looks wrong
    confusion_matrix.png  curves.png                  the report's pictures
"""

LABELS = "labels.txt"
TRAIN_CSV = "train.csv"
EVAL_CSV = "eval.csv"
SKIPPED_CSV = "skipped.csv"
#: The model's description: written last, so its presence marks a finished run.
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
METRICS_JSON = "metrics.json"
RUN_JSON = "run.json"
CHECKPOINT = "checkpoint.pt"
PREDICTIONS_CSV = "eval_predictions.csv"
LABEL_ISSUES_CSV = "label_issues.csv"
REPORT_HTML = "report.html"
TENSORBOARD = "tb"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "curves.png"
#: Manifests whose ``path`` column names input files.
MANIFESTS = (TRAIN_CSV, EVAL_CSV, SKIPPED_CSV)
