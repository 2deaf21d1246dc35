"""Export of a trained run's deployed network (``qexp export``) and its independent check
(``qexp verify``).

Modules: ``pack`` (bit packing of integer codes), ``fileformat`` (the safetensors + JSON file
and its integrity check), ``graph`` (the network as an op graph, from qexp's quantized model),
``write`` (the ``qexp export`` command), ``engine`` (integer inference over the op graph),
``verify`` (the ``qexp verify`` command) and ``onnx`` (QDQ ONNX from the exported file).
``fileformat``, ``pack``, ``engine``, ``onnx`` and ``verify`` never import qexp's training
modules (qexp.quant, qexp.estimators, qexp.models, qexp.train).
"""
