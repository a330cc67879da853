"""The progress callback on its own (no model): what reaches ``progress`` for each log."""

from types import SimpleNamespace

from trainer.common import make_progress_callback


def state(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=4, epoch=step / 4)


def test_eval_loss_during_training_is_reported_once_per_step_and_not_after_it():
    updates = []
    cb = make_progress_callback(updates.append, None)
    args = control = None
    cb.on_train_begin(args, state(0), control)
    cb.on_log(args, state(2), control, logs={"loss": 2.5})
    cb.on_log(args, state(2), control, logs={"eval_loss": 2.0, "eval_runtime": 0.1})
    cb.on_log(args, state(2), control, logs={"eval_loss": 2.0})  # a forced eval, same step
    cb.on_log(args, state(4), control, logs={"loss": 1.5})
    cb.on_log(args, state(4), control, logs={"eval_loss": float("nan")})  # not a point
    cb.on_train_end(args, state(4), control)
    # the evals after training (adapter, then base) log an eval_loss too
    cb.on_log(args, state(4), control, logs={"eval_loss": 1.0})
    cb.on_log(args, state(4), control, logs={"eval_loss": 3.0})

    assert [(u.step, u.loss, u.eval_loss) for u in updates] == [
        (2, 2.5, None),
        (2, 2.5, 2.0),  # the eval's update repeats the last train loss
        (4, 1.5, None),
    ]
    assert cb.eval_history == [{"step": 2, "eval_loss": 2.0}]
    assert cb.history == [{"step": 2, "loss": 2.5}, {"step": 4, "loss": 1.5}]
