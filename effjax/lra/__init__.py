"""The Long Range Arena table runner (Tay et al. 2021, ``shared/methods/lra.md`` §2, §7.2-3, §8).

``python -m effjax.lra`` trains every (attention method, LRA task) cell with ``python -m effjax.main`` and writes
``lra_results.md`` / ``.json`` / ``.png`` in the paper's Table 1 layout. One module per job:

- ``cells``: the task names, cell planning, workdirs ``<workdir>/<task>/<method>/`` and the trainer command;
- ``run_cell``: runs one cell's subprocess(es), its log ``<cell>/run.log`` and its ``result.json``;
- ``results``: a cell's final metrics row and its atomically written ``result.json``;
- ``devices``: device groups per cell (``CUDA_VISIBLE_DEVICES`` or the TPU chip variables);
- ``paper``: LRA Table 1's rows keyed by effjax method name;
- ``report``: the averages (5-task LRA, 6-task with Path-X failure counted as 50) and the Markdown/JSON table;
- ``plot``: the grouped bar chart;
- ``runner``: the loop that plans, runs cells through an executor and rewrites the report as cells finish.
"""
