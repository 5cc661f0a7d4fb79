"""Skip-aware training and its measurements (the ``skipray`` CLI's train, distill-data, calibrate, eval).

``distill_data`` (self-distillation data and on-policy rollouts, with the teacher's top-k), ``calibrate``
(the drop order), ``train`` (LoRA or full fine-tuning under a schedule, KL to the full-depth teacher),
``train_ray`` (the same on Ray Train; the only module here that imports Ray), ``train_cli`` (the
``skipray train`` command over both), ``evaluate`` (quality against speed on held-out prompts and
questions).
"""
