import os, re
from tests.test_scaleout import recipe_command, run, assert_same_weights, nemo_weights
from tests.test_joint_sft import data, model  # noqa
from tests.test_mtbi import behaviors, whisper_dir  # noqa

CB = "+trainer.callbacks=[{_target_: batchlog.BatchLog}]"


def test_dbg(assets, behaviors, whisper_dir, data, tmp_path):
    os.environ["PYTHONPATH"] = "/tmp/dbg:" + os.environ.get("PYTHONPATH", "")
    logs = {}
    for name, extra in (("ddp1", ["trainer.devices=2"]), ("ddp2", ["trainer.devices=2"]),
                        ("one", ["trainer.devices=1", "trainer.accumulate_grad_batches=2"])):
        d = tmp_path / name
        logs[name] = run(recipe_command("joint_text_steps", assets, behaviors, whisper_dir, data, d) + extra + [CB], d)
        with open(f"/tmp/dbg/{name}.log", "w") as f:
            f.write(logs[name])
    for a, b in (("ddp1", "ddp2"), ("ddp1", "one")):
        wa, wb = nemo_weights(tmp_path / a / "out.nemo"), nemo_weights(tmp_path / b / "out.nemo")
        worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].numel())
        print(a, b, worst)
        open("/tmp/dbg/result.txt", "a").write(f"{a} {b} {worst}\n")
