"""The README's main command: `salun-sd demo` erases 'circle' from the shipped toy model."""

from salun_sd.toyworld.demo import demo


def test_demo_erases_circle_keeps_the_other_shapes_and_the_export_reloads(tmp_path):
    summary = demo(tmp_path, per_prompt=4, log=lambda *_: None)
    assert summary["before"]["UA"] <= 0.1 and summary["before"]["remaining_acc"] >= 0.9
    assert summary["after"]["UA"] >= 0.8 and summary["after"]["remaining_acc"] >= 0.8
    # scored again after from_pretrained in a fresh process: the same seeded samples, the same numbers
    assert summary["after_reloaded_in_fresh_process"] == {"UA": summary["after"]["UA"], "remaining_acc": summary["after"]["remaining_acc"]}
    assert (tmp_path / "demo_grid.png").is_file()
