"""Learning dynamics on a fixed subset: per-class accuracy and forgetting events, with galleries at the end."""

from __future__ import annotations

import json
import math
import os
import re

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from callbacks import timing
from callbacks.checked_io import check_positive_int, finite_or_none, write_atomic
from callbacks.figures import display_image, figure_png
from callbacks.steps import Steps
from callbacks.timing import timed

PREDICT_BATCH = 1024  # examples per predict_on_batch call during a look (one call for the default subset)
MAX_LEGEND_CLASSES = 20  # the accuracy plot names classes in a legend only up to this many


class LearningDynamics(keras.callbacks.Callback):
    """Per-class accuracy and example forgetting on a fixed subset of training examples.

    At each look (every epoch end, or every `every_n_steps` training steps) the model classifies the subset in
    inference mode. With acc_i^t = 1[argmax_k p_k(x_i; theta_t) = y_i] at look t, a forgetting event of example i
    is a look with acc_i^{t-1} = 1 and acc_i^t = 0 (Toneva et al. 2019, "An Empirical Study of Example Forgetting
    during Deep Neural Network Learning", sec. 2). Toneva et al. look at each example when it is in a minibatch;
    here all examples are looked at together, so every example is sampled at the same steps.

    Counts are the real number of events. An example never classified correctly has 0 events and
    `first_learned_look` None; Toneva et al. rank such examples as forgotten infinitely often, which
    forgetting.json allows with inf where `first_learned_look` is None. The forgotten gallery shows only
    examples with at least one event, because never-learned ones are already misclassified and shown there.

    With `every_n_steps`, looks fall on steps that are multiples of it, plus one at the end of training if the
    last step is not one; steps are batches trained (callbacks/steps.py). State is kept across fit() calls, so a
    run split into several fits is counted as one; use a new instance per run. `get_state` and `set_state` carry
    it over a resume.
    Put this callback before CSVLogger and TensorBoard so that they see the keys it adds to the epoch logs.

    Outputs: epoch logs get "dynamics/forgetting_events" (total so far) and "dynamics/subset_accuracy" (NaN
    before the first look). In `log_dir`, each look writes scalars "dynamics/class_accuracy/<class>",
    "dynamics/subset_accuracy" and "dynamics/forgetting_events" at the training step, and training's end
    writes images "dynamics/gallery_forgotten", "dynamics/gallery_misclassified" and
    "dynamics/class_accuracy_plot". `out_dir` gets forgetting.json, gallery_forgotten.png,
    gallery_misclassified.png and class_accuracy.png at training's end.
    """

    def __init__(self, x, y, class_names=None, every_n_steps=None, log_dir=None, out_dir=None, max_gallery=25):
        """Creates the callback.

        Args:
            x: the subset's inputs, as the model takes them (raw pixels, shape (n, H, W, C)).
            y: the subset's integer labels, shape (n,) or (n, 1).
            class_names: one name per model output; None names classes "0", "1", ...
            every_n_steps: training steps between looks; None looks at every epoch end.
            log_dir: TensorBoard directory for scalars and images; None writes none.
            out_dir: directory for forgetting.json and the PNGs; None writes none.
            max_gallery: most examples shown in each gallery.
        """
        super().__init__()
        x, y = np.asarray(x), np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"LearningDynamics y: must be integer class ids of shape (n,), got {y.dtype} {y.shape}")
        if len(x) != len(y) or len(y) == 0:
            raise ValueError(f"LearningDynamics x, y: need the same number (> 0) of examples, got {len(x)}, {len(y)}")
        if y.min() < 0 or (class_names is not None and y.max() >= len(class_names)):
            raise ValueError(f"LearningDynamics y: labels must lie in [0, len(class_names)), got {y.min()}..{y.max()}")
        self._steps = Steps(every_n_steps, name="LearningDynamics every_n_steps")
        check_positive_int("LearningDynamics max_gallery", max_gallery)
        self.x, self.y = x, y.astype(np.int32)
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        self.every_n_steps, self.log_dir, self.out_dir, self.max_gallery = every_n_steps, log_dir, out_dir, max_gallery
        # Per look.
        self.look_steps, self.look_epochs, self.subset_accuracy, self.class_accuracy = [], [], [], []
        # Per example; `correct`, `predictions` and `confidence` are those of the latest look.
        self.forgetting_events = np.zeros(len(y), np.int64)
        self.first_learned_look = np.full(len(y), -1, np.int64)
        self.correct = self.predictions = self.confidence = None
        self._epoch = 0
        self._writer = None

    def on_train_begin(self, logs=None):
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    @property
    def _step(self) -> int:
        return self._steps.step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._steps.epoch_begin((self.params or {}).get("steps"))

    def get_state(self) -> dict:
        """Every look so far and the per-example history, for a resumed run to go on as if uninterrupted."""
        arrays = ("forgetting_events", "first_learned_look", "correct", "predictions", "confidence")
        return {"step": self._step, "epoch": self._epoch, "class_names": self.class_names,
                "look_steps": self.look_steps, "look_epochs": self.look_epochs,
                "subset_accuracy": self.subset_accuracy, "class_accuracy": [a.tolist() for a in self.class_accuracy],
                **{name: None if getattr(self, name) is None else getattr(self, name).tolist() for name in arrays}}

    def set_state(self, state: dict) -> list[str]:
        """Restores `get_state`'s state before training resumes.

        Returns:
            What could not be restored, one line each (nothing here).
        """
        self._steps.set_step(state["step"])
        self._epoch, self.class_names = state["epoch"], state["class_names"]
        self.look_steps, self.look_epochs = list(state["look_steps"]), list(state["look_epochs"])
        self.subset_accuracy = list(state["subset_accuracy"])
        self.class_accuracy = [np.asarray(a, np.float64) for a in state["class_accuracy"]]
        self.forgetting_events = np.asarray(state["forgetting_events"], np.int64)
        self.first_learned_look = np.asarray(state["first_learned_look"], np.int64)
        for name, dtype in (("correct", bool), ("predictions", np.int64), ("confidence", np.float64)):
            setattr(self, name, None if state[name] is None else np.asarray(state[name], dtype))
        return []

    def on_train_batch_end(self, batch, logs=None):
        if self._steps.batch_end(batch):
            self.look()

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_n_steps:
            self.look()
        if logs is not None:
            logs["dynamics/forgetting_events"] = int(self.forgetting_events.sum())
            logs["dynamics/subset_accuracy"] = self.subset_accuracy[-1] if self.subset_accuracy else math.nan

    def on_train_end(self, logs=None):
        if not self.look_steps or self._step > self.look_steps[-1]:
            self.look()
        if not self.out_dir and self._writer is None:
            return  # rendering costs about a second; nobody would see it
        pngs = {
            "gallery_forgotten": self._gallery_png(forgotten=True),
            "gallery_misclassified": self._gallery_png(forgotten=False),
            "class_accuracy": self._class_accuracy_png(),
        }
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            write_atomic(os.path.join(self.out_dir, "forgetting.json"), json.dumps(self.summary(), indent=1).encode())
            for name, png in pngs.items():
                write_atomic(os.path.join(self.out_dir, f"{name}.png"), png)
        if self._writer is not None:
            with self._writer.as_default(step=self._step):
                tf.summary.image("dynamics/gallery_forgotten", _decode(pngs["gallery_forgotten"]))
                tf.summary.image("dynamics/gallery_misclassified", _decode(pngs["gallery_misclassified"]))
                tf.summary.image("dynamics/class_accuracy_plot", _decode(pngs["class_accuracy"]))
            self._writer.close()
            self._writer = None

    @timed
    def look(self) -> None:
        """Classifies the subset with the current model and records the look at the current training step."""
        # predict_on_batch reuses Keras's compiled predict function; model.predict costs ~0.1 s more per call.
        batches = (self.x[i : i + PREDICT_BATCH] for i in range(0, len(self.x), PREDICT_BATCH))
        predict = self.model.predict_on_batch
        if getattr(self.model, "distribute_strategy", None) and self.model.distribute_strategy.num_replicas_in_sync > 1:
            # Under a strategy with several replicas, predict_on_batch gives every replica the whole batch and
            # returns the copies concatenated; predict splits the batch.
            def predict(batch):
                return self.model.predict(batch, batch_size=len(batch), verbose=0)
        # The first look traces Keras's predict function: filed as tracing (callbacks.timing), the others as execution.
        with timing.phase(self, "execution" if self.look_steps else "tracing"):
            probabilities = np.concatenate([np.asarray(predict(batch)) for batch in batches])
        if probabilities.ndim != 2 or len(probabilities) != len(self.y):
            shape = probabilities.shape
            raise ValueError(f"LearningDynamics: the model needs one output of shape (n, classes), got {shape}")
        self._record(probabilities)

    def _record(self, probabilities: np.ndarray) -> None:
        num_classes = probabilities.shape[1]
        if self.class_names is None:
            self.class_names = [str(k) for k in range(num_classes)]
        if len(self.class_names) != num_classes or self.y.max() >= num_classes:
            raise ValueError(
                f"LearningDynamics class_names, y: the model has {num_classes} outputs, but there are "
                f"{len(self.class_names)} class names and labels up to {self.y.max()}"
            )
        predictions = probabilities.argmax(axis=1)
        correct = predictions == self.y
        if self.correct is not None:
            self.forgetting_events += self.correct & ~correct
        self.first_learned_look[(self.first_learned_look < 0) & correct] = len(self.look_steps)
        counts = np.bincount(self.y, minlength=num_classes)
        hits = np.bincount(self.y, weights=correct, minlength=num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            class_accuracy = np.where(counts > 0, hits / counts, np.nan)  # NaN: class absent from the subset
        self.correct, self.predictions = correct, predictions
        self.confidence = probabilities[np.arange(len(predictions)), predictions].astype(np.float64)
        self.look_steps.append(self._step)
        self.look_epochs.append(self._epoch)
        self.subset_accuracy.append(float(correct.mean()))
        self.class_accuracy.append(class_accuracy)
        if self._writer is not None:
            with self._writer.as_default(step=self._step):
                for name, accuracy in zip(self.class_names, class_accuracy):
                    if not np.isnan(accuracy):
                        tf.summary.scalar(f"dynamics/class_accuracy/{_tag(name)}", accuracy)
                tf.summary.scalar("dynamics/subset_accuracy", self.subset_accuracy[-1])
                tf.summary.scalar("dynamics/forgetting_events", int(self.forgetting_events.sum()))

    def summary(self) -> dict:
        """Everything recorded so far, as written to forgetting.json (NaN as null).

        Returns:
            A JSON-serializable dict: per-look steps, epochs and accuracies, per-class accuracy histories,
            and per-example labels, forgetting counts, first-learned looks and final predictions.
        """
        learned = self.first_learned_look >= 0
        names = self.class_names or []
        history = np.array(self.class_accuracy).reshape(len(self.look_steps), len(names))
        return {
            "definition": "forgetting event: correct at one look, incorrect at the next (Toneva et al. 2019)",
            "every_n_steps": self.every_n_steps,  # null: one look per epoch end
            "num_examples": len(self.y),
            "class_names": names,
            "looks": {"step": self.look_steps, "epoch": self.look_epochs, "subset_accuracy": self.subset_accuracy},
            "class_accuracy": {name: finite_or_none(history[:, k]) for k, name in enumerate(names)},
            "class_counts": {name: int(n) for name, n in zip(names, np.bincount(self.y, minlength=len(names)))},
            "forgetting_events_total": int(self.forgetting_events.sum()),
            "num_forgotten": int((self.forgetting_events > 0).sum()),
            "num_unforgettable": int((learned & (self.forgetting_events == 0)).sum()),
            "num_never_learned": int((~learned).sum()),
            "examples": {
                "label": self.y.tolist(),
                "forgetting_events": self.forgetting_events.tolist(),
                "first_learned_look": [int(t) if t >= 0 else None for t in self.first_learned_look],
                "first_learned_step": [self.look_steps[t] if t >= 0 else None for t in self.first_learned_look],
                "final_correct": None if self.correct is None else self.correct.tolist(),
                "final_prediction": None if self.predictions is None else self.predictions.tolist(),
                "final_confidence": None if self.confidence is None else finite_or_none(self.confidence),
            },
        }

    def _gallery_png(self, forgotten: bool) -> bytes:
        """Most-forgotten examples (most events first), or misclassified ones (most confident first)."""
        if forgotten:
            chosen = np.flatnonzero(self.forgetting_events > 0)
            chosen = chosen[np.lexsort((chosen, self.correct[chosen], -self.forgetting_events[chosen]))]
            title = f"Most-forgotten training examples: {len(chosen)} of {len(self.y)} forgotten at least once"
        else:
            chosen = np.flatnonzero(~self.correct)
            chosen = chosen[np.argsort(-self.confidence[chosen], kind="stable")]
            title = f"Misclassified training examples at step {self.look_steps[-1]}: {len(chosen)} of {len(self.y)}"
        chosen = chosen[: self.max_gallery]
        columns = max(1, math.ceil(math.sqrt(len(chosen))))
        rows = max(1, math.ceil(len(chosen) / columns))
        figure = Figure(figsize=(max(4.0, 1.7 * columns), 0.6 + 1.9 * rows), dpi=100)
        figure.suptitle(title, fontsize=9)
        if len(chosen) == 0:
            figure.text(0.5, 0.5, "none", ha="center", va="center")
        for position, i in enumerate(chosen):
            axes = figure.add_subplot(rows, columns, position + 1)
            axes.imshow(display_image(self.x[i]), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            events = "never learned" if self.first_learned_look[i] < 0 else f"forgotten {self.forgetting_events[i]}"
            true, predicted = self.class_names[self.y[i]], self.class_names[self.predictions[i]]
            axes.set_title(f"true {true} / pred {predicted}\n{events}", fontsize=6)
            axes.set_axis_off()
        figure.tight_layout()
        return figure_png(figure)

    def _class_accuracy_png(self) -> bytes:
        """Per-class accuracy over training, one line per class, and the whole subset's accuracy dashed."""
        figure = Figure(figsize=(8, 4.5), dpi=100)
        axes = figure.add_subplot(1, 1, 1)
        history = np.array(self.class_accuracy)
        marker = "." if len(self.look_steps) <= 50 else None
        for k, name in enumerate(self.class_names):
            axes.plot(self.look_steps, history[:, k], marker=marker, linewidth=1, label=name)
        axes.plot(self.look_steps, self.subset_accuracy, "k--", linewidth=2, label="all")
        axes.set(xlabel="training step", ylabel="accuracy on the fixed subset", ylim=(0, 1.02))
        axes.set_title(f"Per-class accuracy on {len(self.y)} training examples", fontsize=10)
        axes.grid(alpha=0.3)
        if len(self.class_names) <= MAX_LEGEND_CLASSES:
            axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        figure.tight_layout()
        return figure_png(figure)


def _decode(png: bytes) -> tf.Tensor:
    return tf.image.decode_png(png, channels=3)[tf.newaxis]


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
