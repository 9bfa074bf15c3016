"""Which accelerators each cell sees: ``--devices`` split into groups of ``--gpus_per_cell``, one group per slot.

GPUs are chosen with ``CUDA_VISIBLE_DEVICES``. TPU chips on one VM are shared between independent processes with
the TPU runtime's topology variables (one chip group, 1x1x1 processes, and a mesh-controller port of its own per
process); TPU v2/v3 chips show up as two JAX devices each.
"""

_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
_TPU_PORT = 8476


def groups(devices, per_cell: int) -> list[tuple[str, ...]]:
    """``devices`` (ids) in consecutive groups of ``per_cell``; the remainder, if any, stays idle."""
    devices = [str(d).strip() for d in devices if str(d).strip()]
    if per_cell < 1:
        raise ValueError(f"--gpus_per_cell={per_cell} must be >= 1.")
    if len(devices) < per_cell:
        raise ValueError(f"--devices lists {len(devices)} device(s) but --gpus_per_cell={per_cell}; list at least "
                         f"{per_cell} ids (e.g. --devices=0,1,2,3).")
    return [tuple(devices[i:i + per_cell]) for i in range(0, len(devices) - per_cell + 1, per_cell)]


def env(group: tuple[str, ...], slot: int, platform: str = "gpu") -> dict[str, str]:
    """The environment variables that restrict a cell's process to ``group`` (slot: its index, for TPU ports)."""
    ids = ",".join(group)
    if platform == "gpu":
        return {"CUDA_VISIBLE_DEVICES": ids}
    if platform == "tpu":
        if len(group) not in _TPU_BOUNDS:
            raise ValueError(f"--gpus_per_cell={len(group)} chips per TPU process: use one of "
                             f"{', '.join(map(str, _TPU_BOUNDS))}.")
        port = str(_TPU_PORT + slot)
        return {"TPU_VISIBLE_CHIPS": ids, "TPU_VISIBLE_DEVICES": ids, "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS[len(group)], "TPU_MESH_CONTROLLER_PORT": port,
                "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}", "TPU_PROCESS_PORT": port}
    raise ValueError(f"--device_platform={platform!r}; use gpu or tpu.")
