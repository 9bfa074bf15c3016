"""Losses and metrics per task. Metrics are weighted sums so batches and hosts add up exactly."""

import jax
import jax.numpy as jnp
import optax


def _weights(batch, shape):
    w = batch.get("weights")
    return jnp.ones(shape, jnp.float32) if w is None else w.astype(jnp.float32)


def classification(logits, batch, *, num_classes, label_smoothing=0.0):
    """Cross-entropy over [batch, classes] logits; returns (mean loss, sums)."""
    targets = batch["targets"]
    weights = _weights(batch, targets.shape)
    onehot = jax.nn.one_hot(targets, num_classes)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    loss = optax.softmax_cross_entropy(logits, onehot)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    sums = {
        "loss": (loss * weights).sum(),
        "accuracy": (correct * weights).sum(),
        "count": weights.sum(),
        # Per-class counts give the majority-class rate of exactly the examples evaluated.
        "label_counts": (jax.nn.one_hot(targets, num_classes) * weights[:, None]).sum(0),
    }
    return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums


def lm(logits, batch, **_):
    """Next-token cross-entropy: logits at position t predict token t + 1; padding (id 0) is ignored."""
    targets = batch["inputs"][:, 1:]
    logits = logits[:, :-1]
    weights = (targets != 0).astype(jnp.float32) * _weights(batch, targets.shape[:1])[:, None]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    sums = {"loss": (loss * weights).sum(), "accuracy": (correct * weights).sum(), "count": weights.sum()}
    return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums


def pretrain(out, batch, **_):
    """Self-pretraining's denoising cross-entropy (Amos et al. 2024, Sec. 3) over the predicted positions only.

    ``out`` is ``encoder_pretrain``'s dict: ``logits`` [batch, length, vocab], ``targets`` [batch, length] (the
    original tokens, or the next ones) and ``weights`` [batch, length] (1 where a token is predicted); the batch's
    labels are not used. Padding rows of an eval batch carry weight 0.
    """
    logits, targets = out["logits"], out["targets"]
    weights = out["weights"].astype(jnp.float32) * _weights(batch, targets.shape[:1])[:, None]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    sums = {"loss": (loss * weights).sum(), "accuracy": (correct * weights).sum(), "count": weights.sum()}
    return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums


def summarize(sums) -> dict:
    """Turns accumulated sums into means (and the majority-class rate when label counts exist)."""
    count = max(float(sums["count"]), 1.0)
    out = {"loss": float(sums["loss"]) / count, "accuracy": float(sums["accuracy"]) / count}
    if "label_counts" in sums:
        out["majority_class_rate"] = float(jnp.max(sums["label_counts"])) / count
    return out
