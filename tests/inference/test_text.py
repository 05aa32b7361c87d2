import torch

from looplm_mega.data.tokenizer import train_bpe_tokenizer
from looplm_mega.inference.generate import GenerationConfig
from looplm_mega.inference.text import cut_at_stop, generate_text
from tests.helpers import build_model


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("a = 1\n\nb = 2\nreturn", ["return", "\n\n"]) == ("a = 1", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_text_generation_cuts_at_stop_strings_and_streams_exactly_the_returned_text():
    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 30, 300)
    torch.manual_seed(0)
    model = build_model(vocab_size=tokenizer.get_vocab_size()).eval()
    config = GenerationConfig(max_new_tokens=24)
    free, _ = generate_text(model, tokenizer, ["def ", "import os"], config)
    stop = free[0][1:3]  # a stop string that the first continuation is known to contain
    pieces: dict[int, str] = {}
    texts, result = generate_text(model, tokenizer, ["def ", "import os"], GenerationConfig(max_new_tokens=24),
                                  stop=[stop], stream=lambda row, piece: pieces.__setitem__(row, pieces.get(row, "") + piece))
    assert texts[0] == free[0][: free[0].index(stop)]
    assert stop not in texts[0] and len(result.tokens[0]) < 24
    assert texts[1] == cut_at_stop(free[1], [stop])[0]
    assert [pieces.get(row, "") for row in range(2)] == texts
