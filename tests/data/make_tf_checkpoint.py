"""Write the tiny OpenAI-layout TensorFlow checkpoint in tests/data/gpt2-tf-tiny (run once; needs TensorFlow).

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    /tmp/tfvenv/bin/python tests/data/make_tf_checkpoint.py

The variables are named and shaped as in OpenAI's released GPT-2 checkpoints (``model/wte``,
``model/h0/attn/c_attn/w`` with a leading axis of 1, ...) and saved with TensorFlow's own v1
``Saver``, as OpenAI's were. The values are random; ``expected.npz`` holds every variable as TF read
it back, so the test can check gptforge's TensorFlow-free reader against TensorFlow itself.
"""

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

HPARAMS = {"n_vocab": 64, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 12}  # 12 layers: an index of several blocks
OUT = Path(__file__).parent / "gpt2-tf-tiny"


def variables(hp: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    C, V, T = hp["n_embd"], hp["n_vocab"], hp["n_ctx"]

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model/wte": rand(V, C), "model/wpe": rand(T, C)}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}"
        out.update({
            f"{p}/ln_1/g": 1 + rand(C, scale=0.1), f"{p}/ln_1/b": rand(C, scale=0.1),
            f"{p}/attn/c_attn/w": rand(1, C, 3 * C), f"{p}/attn/c_attn/b": rand(3 * C, scale=0.1),
            f"{p}/attn/c_proj/w": rand(1, C, C), f"{p}/attn/c_proj/b": rand(C, scale=0.1),
            f"{p}/ln_2/g": 1 + rand(C, scale=0.1), f"{p}/ln_2/b": rand(C, scale=0.1),
            f"{p}/mlp/c_fc/w": rand(1, C, 4 * C), f"{p}/mlp/c_fc/b": rand(4 * C, scale=0.1),
            f"{p}/mlp/c_proj/w": rand(1, 4 * C, C), f"{p}/mlp/c_proj/b": rand(C, scale=0.1),
        })
    out.update({"model/ln_f/g": 1 + rand(C, scale=0.1), "model/ln_f/b": rand(C, scale=0.1)})
    return out


def main() -> None:
    OUT.mkdir(exist_ok=True)
    values = variables(HPARAMS, np.random.default_rng(2019))
    tf.compat.v1.disable_eager_execution()
    graph = tf.Graph()
    with graph.as_default():
        tf_vars = [tf.compat.v1.get_variable(name, initializer=value) for name, value in values.items()]
        saver = tf.compat.v1.train.Saver(tf_vars)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            os.chdir(OUT)  # a relative save path gives a relative path in `checkpoint`, as in OpenAI's files
            saver.save(sess, "model.ckpt", write_meta_graph=False)  # the graph (.meta) is not needed to read
    (OUT / "hparams.json").write_text(json.dumps(HPARAMS, indent=2) + "\n")
    # what TensorFlow itself reads back from the files it wrote
    reader = tf.train.load_checkpoint(str(OUT / "model.ckpt"))
    read_back = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    assert sorted(read_back) == sorted(values)
    for name, value in values.items():
        np.testing.assert_array_equal(read_back[name], value)
    np.savez(OUT / "expected.npz", **read_back)
    print(f"wrote {OUT}: {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
