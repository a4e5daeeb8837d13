"""FGNet training, beside the shipped package (never in the add-on zip): the cache of coarse fits
(``cache``), synthetic turned views (``novel_view``, ``views``), batches built through the pipeline's
own FGNet input contract (``batches``), the losses, evaluation and the trainer.  The command is
``python -m fg3d_blender train-fgnet`` from a checkout (``training.cli``)."""
