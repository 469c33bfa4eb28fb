"""The oscillation penalty's value and gradient written out by hand in numpy: the independent formula the
reference and fused penalties are tested against, on whole and on FSDP2-sharded weights."""

import numpy as np


def reference_numpy(weights, bits, per_channel=False, normalization="layer_mean"):
    """Value and gradient of sum_l mean(q(W_l)^2 - W_l^2) ("layer_mean"), or of sum_l sum(q(W_l)^2 - W_l^2) / N with
    N the number of all weights ("global_mean"), written out by hand (float64)."""
    top = 2 ** (bits - 1) - 1
    value, grads = 0.0, []
    total = sum(w.size for w in weights)
    for w in weights:
        rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        grad_rows = np.zeros_like(rows)
        n = w.size if normalization == "layer_mean" else total
        for i, row in enumerate(rows):
            s = np.abs(row).max() / top
            r = np.round(row / s)
            q = r * s
            value += np.sum(q**2 - row**2) / n
            grad_rows[i] = 2 / n * (q - row)  # straight-through part
            dp_ds = 2 / n * np.sum(q * (r - row / s))  # dq/ds = round(w/s) - w/s
            peaks = np.flatnonzero(np.abs(row) == np.abs(row).max())
            grad_rows[i, peaks] += dp_ds * np.sign(row[peaks]) / top / len(peaks)
        grads.append(grad_rows.reshape(w.shape))
    return value, grads
