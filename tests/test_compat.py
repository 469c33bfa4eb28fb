from hf_oscq import _compat


def test_every_private_api_hf_oscq_uses_exists_in_the_installed_versions():
    assert _compat.check_private_apis() == []


def test_gradient_accumulation_rule_mirrors_the_trainer():
    from types import SimpleNamespace

    def trainer(scaled=None, accepts=False, loss_func=None):
        return SimpleNamespace(
            loss_is_scaled_for_ga=scaled, model_accepts_loss_kwargs=accepts, compute_loss_func=loss_func
        )

    rule = _compat.loss_is_scaled_for_gradient_accumulation
    assert rule(trainer(scaled=True), None) is True and rule(trainer(scaled=False, accepts=True), 8) is False
    assert rule(trainer(accepts=True), 8) and not rule(trainer(accepts=True), None)
    assert rule(trainer(loss_func=len), None) and not rule(trainer(), 8)
