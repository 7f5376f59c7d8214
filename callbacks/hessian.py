"""Hessian-vector products of a Keras model's compiled loss, and the top eigenvalue and trace estimated from them.

The loss is L(theta) = the model's compiled loss (mean-reduced, plus its regularization losses) on a fixed set of K
examples, with the model in inference mode (BatchNormalization normalizes with its moving statistics, dropout is
off), so L is one deterministic function of the trainable weights theta and H = d^2 L / d theta^2 is symmetric.

Hessian-vector product by double backprop (Pearlmutter 1994): H v = d/d theta (grad L(theta) . v), two reverse
passes, one `tf.function`; the K examples go through in chunks of at most `batch_size`, each chunk's product
weighted by its share of the K examples (so the mean-reduced loss of all K is differentiated). The function is traced
without AutoGraph, as the other instruments' functions are: the product is straight-line code, and Keras 3 does not
convert a layer's call (a model with Python control flow on tensors cannot be fitted either). Its first call, tracing
included, took 1.4-1.9 s in the runs of the default sweep with curvature (filed as the instrument's "tracing" phase);
AutoGraph's share of it was not measurable there (the same runs' first measurements took as long with it).

One trace per architecture in a process (callbacks/shared_traces.py): the product takes the weights as arguments and
evaluates a template model of the architecture at them, so the runs of a sweep, which train one after another in one
process with a new model each, trace it once.

Top eigenvalue by Lanczos iteration with full reorthogonalization (Yao et al. 2020, "PyHessian", use power
iteration; Lanczos needs fewer products for the same precision, Ghorbani et al. 2019): after j products with a
random unit start q_1, the tridiagonal T_j = Q_j^T H Q_j has the Ritz values theta_i; the largest, with Ritz
vector y = Q_j s, satisfies |H y - theta y| = beta_j |s_j| (the last component of s), and some eigenvalue of H lies
within that residual of theta (Parlett, "The Symmetric Eigenvalue Problem", thm. 4.5.1). The iteration stops when
beta_j |s_j| <= tolerance * |theta|: the stated relative tolerance. Lanczos finds the largest eigenvalue, not the
largest in magnitude (power iteration's), so a negative curvature direction at initialization is not mistaken for
the top one. A start vector almost orthogonal to the top eigenvector could make it converge to a lower one first;
a random start makes that improbable.

Trace by Hutchinson's estimator (Hutchinson 1990; Avron & Toledo 2011) with m Rademacher probes z_i in {-1, +1}^P:
tr(H) ~ t = (1/m) sum_i z_i^T H z_i, an unbiased estimate with Var(z^T H z) = 2 sum_{i != j} H_ij^2; the 95% interval
is t +- t_{m-1, 0.975} s / sqrt(m), with s the sample standard deviation of the m quadratic forms. With a relative
tolerance r the probes are drawn in blocks of `min_probes` and stop after the first block at which the half-width
t_{m-1, 0.975} s / sqrt(m) <= r |t| (or at the most probes): a sequential rule, so its coverage is that of the rule
(tested against the exact trace, tests/callbacks/test_curvature.py), not the fixed-m t interval's.

Deflation by the Lanczos basis (Gambhir, Stathopoulos & Orginos 2017, "Deflation as a method of variance reduction
for estimating the trace of a matrix inverse"; Meyer et al. 2021, "Hutch++", with a random sketch in place of the
Krylov basis): with Q the k orthonormal Lanczos vectors of the top eigenvalue's run and P = Q Q^T,

    tr(H) = tr(Q^T H Q) + tr((I - P) H (I - P)),     tr(Q^T H Q) = sum_j alpha_j = sum_j q_j^T H q_j,

so the first term is known exactly from products already made, and Hutchinson estimates only the second, with probes
z' = (I - P) z: z'^T H z' is unbiased for it (given Q, which the probes do not depend on). Its variance,
2 sum_{i != j} A_ij^2 for A = (I - P) H (I - P), lacks the top of the spectrum, which dominates a network Hessian's
Frobenius norm, so fewer probes reach a relative tolerance (benchmarks/curvature_cost.py measures the probes and
products with and without deflation at the same weights).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import callbacks.shared_traces as shared_traces
from callbacks.noise_estimates import quantile
from callbacks.timing import call


class HessianVectorProducts:
    """H v for flat vectors v (float64 NumPy, length P = trainable parameters) on fixed examples (x, y).

    Args:
        model: a compiled Keras model.
        x: inputs of the K examples (NumPy or tensors, first axis K).
        y: their targets.
        batch_size: most examples per chunk of the product (memory: two backward passes of this many).
        timer: the instrument whose time the calls are filed under (callbacks.timing phases), or None.
    """

    def __init__(self, model, x, y, batch_size: int, timer=None):
        self.model, self.timer = model, timer
        self.sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
        self.dimension = int(sum(self.sizes))
        count = len(tf.nest.flatten(x)[0])
        self.chunks = [
            (tf.nest.map_structure(lambda t: tf.constant(t[start : start + batch_size]), x),  # noqa: B023
             tf.constant(y[start : start + batch_size]),
             min(batch_size, count - start) / count)
            for start in range(0, count, batch_size)
        ]
        self.products = 0
        self._function = shared_traces.shared(
            model, "hessian_vector_product",
            lambda template: tf.function(_Product(template), reduce_retracing=True, autograph=False))

    def __call__(self, vector: np.ndarray) -> np.ndarray:
        """H v in float64 (the product is computed in the variables' dtype)."""
        flat = tf.constant(vector, tf.float32)
        trainable, non_trainable = shared_traces.weights(self.model)
        total = np.zeros(self.dimension)
        for x, y, weight in self.chunks:
            arguments = (x, y, flat, trainable, non_trainable)
            product = call(self.timer, self._function, *arguments) if self.timer else self._function(*arguments)
            total += weight * product.numpy().astype(np.float64)
        self.products += 1
        return total


class _Product:
    """H v of a template model's compiled loss at given weights (HessianVectorProducts; module docstring)."""

    def __init__(self, model):
        self.model = model
        self.sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]

    def __call__(self, x, y, flat, trainable, non_trainable):
        model = self.model
        parts = tf.split(flat, self.sizes)
        vector = [tf.cast(tf.reshape(p, v.shape), v.dtype) for p, v in zip(parts, trainable)]
        # One StatelessScope: the template's variables read as the given weights; BN moving statistics, seed states
        # and metric updates made in it are discarded.
        mapping = shared_traces.template_mapping(model, trainable, non_trainable)
        with tf.GradientTape() as outer:
            outer.watch(trainable)
            with tf.GradientTape() as inner:
                inner.watch(trainable)
                with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                    y_pred = model(x, training=False)
                    loss = model.compute_loss(x, y, y_pred, training=False)
            gradients = inner.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            directional = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(gradients, vector)])
        products = outer.gradient(directional, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.concat([tf.reshape(tf.cast(p, tf.float32), [-1]) for p in products], 0)


def top_eigenvalue(hvp, dimension: int, rng: np.random.Generator, tolerance: float, max_products: int) -> dict:
    """The largest eigenvalue of H by Lanczos with full reorthogonalization (module docstring).

    Args:
        hvp: v -> H v on float64 vectors of length `dimension`.
        dimension: P.
        rng: draws the start vector.
        tolerance: stop when the Ritz residual beta_j |s_j| <= tolerance * |theta|.
        max_products: stop after this many products, unconverged.

    Returns:
        {"value": theta, "residual": beta_j |s_j|, "products": j, "converged": bool, "basis": the j orthonormal
        Lanczos vectors (j, P), "restricted_trace": tr(Q^T H Q) = sum of the alphas}.
    """
    basis = np.empty((min(max_products, dimension), dimension))
    q = rng.standard_normal(dimension)
    basis[0] = q / np.linalg.norm(q)
    alphas, betas = [], []
    for j in range(len(basis)):
        w = hvp(basis[j])
        alphas.append(float(basis[j] @ w))
        # Two passes of classical Gram-Schmidt against every earlier vector ("twice is enough", Giraud et al. 2005).
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(np.linalg.norm(w))
        tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        values, vectors = np.linalg.eigh(tridiagonal)
        theta, residual = float(values[-1]), beta * abs(float(vectors[-1, -1]))
        # An invariant subspace (beta ~ 0, e.g. P products) makes theta exact up to rounding.
        if residual <= tolerance * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-30):
            return {"value": theta, "residual": residual, "products": j + 1, "converged": True,
                    "basis": basis[: j + 1], "restricted_trace": float(sum(alphas))}
        if j + 1 < len(basis):
            basis[j + 1] = w / beta
            betas.append(beta)
    return {"value": theta, "residual": residual, "products": len(basis), "converged": dimension == len(basis),
            "basis": basis, "restricted_trace": float(sum(alphas))}


def hutchinson_trace(hvp, dimension: int, rng: np.random.Generator, probes: int, confidence: float = 0.95,
                     relative_half_width: float | None = None, min_probes: int = 8, deflation=None) -> dict:
    """tr(H) by Hutchinson's estimator with at most `probes` Rademacher probes drawn from rng (module docstring).

    Args:
        relative_half_width: stop at the first block of min_probes probes whose interval's half-width is at most
            this fraction of |estimate|; None draws all `probes`.
        min_probes: the block size of the sequential rule (at least 2).
        deflation: None, or (Q, tr(Q^T H Q)) with Q's rows orthonormal (top_eigenvalue's "basis" and
            "restricted_trace"): the probes then estimate tr((I - P) H (I - P)) only (module docstring).

    Returns:
        trace_interval of the probes' quadratic forms z^T H z (z'^T H z' plus tr(Q^T H Q) with deflation).
    """
    if probes < 2:
        raise ValueError(f"trace_probes: needs at least 2 probes for an interval, got {probes}")
    basis, exact = deflation if deflation is not None else (None, 0.0)
    block = max(2, min(min_probes, probes)) if relative_half_width else probes
    forms = []
    while len(forms) < probes:
        for _ in range(min(block, probes - len(forms))):
            z = rng.integers(0, 2, dimension) * 2.0 - 1.0
            if basis is not None and len(basis):
                z -= basis.T @ (basis @ z)
            forms.append(exact + float(z @ hvp(z)))
        result = trace_interval(np.array(forms), confidence)
        if relative_half_width and result["hi"] - result["value"] <= relative_half_width * abs(result["value"]):
            break
    return result


def trace_interval(forms: np.ndarray, confidence: float = 0.95) -> dict:
    """Hutchinson's estimate from m quadratic forms z_i^T H z_i, and its Student-t interval (module docstring).

    Returns:
        {"value": mean, "lo", "hi": the interval's ends, "se": standard error, "probes": m}.
    """
    forms = np.asarray(forms, np.float64)
    mean, se = float(forms.mean()), float(forms.std(ddof=1) / np.sqrt(len(forms)))
    half = quantile(len(forms) - 1, confidence) * se
    return {"value": mean, "lo": mean - half, "hi": mean + half, "se": se, "probes": len(forms)}
