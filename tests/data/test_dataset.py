"""Task mixture sampling, packing with attention isolation, padding."""

from collections import Counter

import pytest
import torch

from tests.conftest import build_tiny
from unitoken.data.dataset import MixtureSampler, ShardDataset, pack_samples, pad_samples
from unitoken.data.pretokenize import pretokenize
from unitoken.data.synth import synthesize
from unitoken.data.validate import validate_manifest
from unitoken.model.sequence import IGNORE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    synthesize(d / "data", 16, seed=9)
    validate_manifest(d / "data" / "manifest.jsonl", d / "v")
    model, tok, builder = build_tiny()
    pretokenize(d / "v" / "clean.jsonl", model, d / "p", shard_size=64)
    return model, ShardDataset(d / "p", builder, splits=None)


def test_mixture_follows_ratio():
    tasks = ["understanding"] * 90 + ["generation"] * 10
    sampler = MixtureSampler(tasks, {"understanding": 1, "generation": 2}, seed=0)
    drawn = Counter(tasks[next(sampler)] for _ in range(3000))
    assert abs(drawn["generation"] / 3000 - 2 / 3) < 0.03
    assert sampler.drawn == {"understanding": drawn["understanding"], "generation": drawn["generation"]}


def test_mixture_resumes_exactly():
    tasks = ["understanding"] * 7 + ["generation"] * 5
    a = MixtureSampler(tasks, {"understanding": 1, "generation": 1}, seed=3)
    first = [next(a) for _ in range(23)]
    state = a.state_dict()
    rest = [next(a) for _ in range(40)]
    b = MixtureSampler(tasks, {"understanding": 1, "generation": 1}, seed=3)
    b.load_state_dict(state)
    assert [next(b) for _ in range(40)] == rest
    assert len(set(first[:7])) > 1


def test_mixture_missing_task_is_an_error():
    with pytest.raises(ValueError, match=r"asks for tasks \['generation'\]"):
        MixtureSampler(["understanding"], {"understanding": 1, "generation": 1})


def test_packed_and_padded_give_same_per_sample_loss(dataset):
    """Same samples, packed (positions restart, no cross-attention) vs padded: same per-sample CE."""
    model, ds = dataset
    model.eval()
    samples = [ds[i] for i in range(10)]
    packed = pack_samples(samples, 640, model.tokens.pad)
    padded = pad_samples(samples, model.tokens.pad)
    assert packed["input_ids"].shape[0] < len(samples)  # several samples share a row
    with torch.no_grad():
        lp = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], images=packed["images"])["logits"]
        ld = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                   images=padded["images"])["logits"]

    def ce(logits, labels):
        keep = labels[1:] != IGNORE
        return torch.nn.functional.cross_entropy(logits[:-1][keep].float(), labels[1:][keep])

    k = 0
    for row, lens in enumerate(packed["seq_lens"]):
        at = 0
        for n in lens:
            a = ce(lp[row, at: at + n], packed["labels"][row, at: at + n])
            b = ce(ld[k, :n], padded["labels"][k, :n])
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            at += n
            k += 1
    assert k == len(samples)
    # and the batch losses agree (token-weighted mean over the same labelled tokens)
    with torch.no_grad():
        loss_p = model(**{k: v for k, v in packed.items() if k != "seq_lens"})["ce"]
        loss_d = model(**padded)["ce"]
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-5, atol=1e-5)


def test_packing_rejects_oversized_sample(dataset):
    model, ds = dataset
    with pytest.raises(ValueError, match=r"sample 0 \(source '[\w-]+', task \w+\) has \d+ tokens > max_seq_len 50"):
        pack_samples([ds[0]], 50, model.tokens.pad)


def test_sample_loss_reduction_is_the_mean_of_per_sample_losses(dataset):
    """loss_reduction=sample: the batch CE is the plain mean of each sample's own token-mean CE
    (packed or padded), so short answers weigh as much as image blocks."""
    from unitoken.data.dataset import sample_loss_weights

    model, ds = dataset
    model.eval()
    samples = [ds[i] for i in range(10)]
    with torch.no_grad():
        own = torch.stack([model(**pad_samples([s], model.tokens.pad))["ce"] for s in samples])
        packed = pack_samples(samples, 640, model.tokens.pad)
        padded = pad_samples(samples, model.tokens.pad)
        for batch, seq_lens in ((packed, packed.pop("seq_lens")), (padded, [[len(s)] for s in samples])):
            weights = sample_loss_weights(batch["labels"], seq_lens)
            torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
            ce = model(**batch, loss_weights=weights)["ce"]
            torch.testing.assert_close(ce, own.mean(), rtol=1e-5, atol=1e-5)


def test_sample_too_long_is_named_with_its_counts():
    """A unitoken-7b-anyres sample that truly cannot fit (two worst-case AnyRes images + text in 7,168-token
    rows) raises naming the sample and its numbers, for packing and for every collate path; one fits."""
    from unitoken.data.dataset import Sample, check_fits
    from unitoken.model.sequence import ImageInput, SequenceBuilder
    from unitoken.model.tokens import SpecialTokens, build_tokenizer
    from unitoken.model.unitoken import ContinuousImages
    from unitoken.model.vision import num_continuous_features
    from unitoken.recipes import get_recipe
    from unitoken.train.batching import collate

    recipe = get_recipe("unitoken-7b-anyres")
    cfg, stage = recipe.model, recipe.train.stage2
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    b = SequenceBuilder(SpecialTokens.from_vocab(tok.get_vocab(), cfg.max_grid_tokens), tok, cfg)

    def sample(n_images):
        n = num_continuous_features((2, 2), (768, 768), cfg.vision)
        images = [ImageInput(torch.zeros(32, 32, dtype=torch.long), n) for _ in range(n_images)]
        enc = b.conversation([{"from": "human", "value": "<|image|>" * n_images + "Compare."},
                              {"from": "gpt", "value": "Same."}], images)
        cont = ContinuousImages(torch.zeros(5 * n_images, 3, 1, 1), [(2, 2)] * n_images, [(768, 768)] * n_images)
        return Sample(enc, cont, "understanding", "pairs", 3, n * n_images)

    one, two = sample(1), sample(2)
    check_fits([one], stage.max_seq_len)
    message = (r"sample 3 \(source 'pairs', task understanding\) has 95\d\d tokens > max_seq_len 7168: 7398 continuous "
               r"features of 2 input images \(AnyRes grids \[\(2, 2\), \(2, 2\)\]\) \+ 21\d\d text, discrete-image "
               r"and marker tokens; fix: raise the stage's max_seq_len to >= 95\d\d or drop the record")
    with pytest.raises(ValueError, match=message):
        pack_samples([one, two], stage.max_seq_len, 0)
    for packing, attention in [(True, "varlen"), (True, "sdpa"), (False, "sdpa")]:
        with pytest.raises(ValueError, match=message):
            collate([two], stage, packing, 0, "cpu", attention=attention)
