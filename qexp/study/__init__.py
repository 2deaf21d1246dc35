"""`qexp study`: a fair comparison of estimators in one resumable command.

Stages (qexp/study/pipeline.py): full-precision references trained once per (model, data set,
seed) to a validation plateau and cached (qexp.train.partner); tuning of every method with the
same Optuna budget on validation data only (qexp/study/tune.py); final runs of each method's
best configuration over several seeds, every one starting from its seed's reference; paired
statistics against the baseline (qexp/study/stats.py) and the report (qexp/study/report.py).
"""
