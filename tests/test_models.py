"""GPT-2 sizes on keras-hub, built from configs (no download)."""

import numpy as np
import pytest

from models import gpt2


@pytest.mark.parametrize(
    "name, millions",
    # GPT-2 small / medium / large with the 50,257-token vocabulary and
    # 1,024 positions, the LM head tied to the token embedding.
    [("125m", 124.4), ("355m", 354.8), ("770m", 774.0)],
)
def test_named_sizes_have_gpt2_parameter_counts(name, millions):
    model = gpt2.build(name)
    assert abs(model.count_params() / 1e6 - millions) <= 0.03 * millions


def test_tiny_forward_pass_gives_next_token_logits():
    model = gpt2.build("tiny", block_size=16)
    x = {
        "token_ids": np.arange(32).reshape(2, 16),
        "padding_mask": np.ones((2, 16), bool),
    }
    logits = model(x)
    assert logits.shape == (2, 16, 50257)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_no_dropout_as_in_the_paper():
    assert gpt2.build("tiny").backbone.get_config()["dropout"] == 0.0


def test_unknown_size_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="125m"):
        gpt2.build("gpt5")
