"""The audits of a trained run: Grad-CAM attention (``attention``, ``explain``), the artifact and acquisition stress
tests (``stress``, ``interventions``, ``acquisition``, with the corner geometry in ``corners``), the OOD guard
(``ood``) and the shift check (``shift``). They read a run through ``core.run`` and never import training code."""
