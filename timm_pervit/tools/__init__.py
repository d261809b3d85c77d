"""The tooling of timm-pervit: what people run around the models, not what the models need.

* ``convert``: official checkpoint -> hub-ready folder, verified, optionally published (``pervit-convert``);
* ``benchmark``: speed and memory against the official formula and the authors' code (``pervit-benchmark``), with
  ``reference`` (the explicit official formula on the same weights) and ``official`` (loads the authors' code);
* ``demo``: the offline end-to-end demo; ``visualize``: the position-attention plots;
* ``model_card``: model cards and ``save_for_hf`` folders; ``flops``: MAC counting (``timm_pervit.count_gmacs``);
* ``recipes``: the paper's training recipes for timm's ``train.py``; ``progress``: the shared progress reporting.

The commands are ``python -m timm_pervit <command>`` and the console scripts in ``pyproject.toml``. The runtime (the
model, its layers, checkpoint loading, the hub helpers and the start-up registration) never imports this package, so
``import timm_pervit`` and ``timm.create_model('pervit_*')`` load none of it.
"""
