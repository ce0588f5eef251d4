"""gemsjax.masking on real sequences: rates, exact agreement with a per-sequence reference,
reference-code quirks, corruption statistics, MAE masks and the run-time strategy switch."""

import gzip

import jax
import jax.numpy as jnp
import masking_reference as ref
import numpy as np
import pytest

from gemsjax import config, masking
from gemsjax.models.mae import compact_visible
from gemsjax.pmi import load_genemask_ranks
from gemsjax.tokenizers import KmerTokenizer
from gemsjax.vocab import get_vocab

VOCAB = get_vocab("dnabert", 6)
KEY = jax.random.key(20240807)


@pytest.fixture(scope="module")
def ranks():
    return load_genemask_ranks(ref.RANKS)


@pytest.fixture(scope="module")
def chr22():
    """1024 rows: CLS + 505 6-mers of real chr22 sequence + SEP + 5 PAD."""
    return ref.dnabert_batch(ref.chr22_chunks(1024))


def _gue(shared_data, task, rows, max_len):
    with gzip.open(shared_data / "gue" / task / "test.csv.gz", "rt") as f:
        seqs = [line.split(",")[0] for line in f.read().splitlines()[1 : rows + 1]]
    return ref.dnabert_batch(seqs, max_len)


def _barcodes(shared_data, rows):
    """The first ``rows`` BOLD COI barcodes (gaps removed), as raw strings."""
    with gzip.open(
        shared_data / "bold_insect_coi_barcodes" / "insect_coi_barcodes.tsv.gz", "rt"
    ) as f:
        lines = f.read(6_000_000).splitlines()[1 : rows + 1]
    return [line.split("\t")[-1].replace("-", "") for line in lines]


@pytest.fixture(scope="module")
def barcodes_with_n(shared_data):
    """Real barcodes containing N, in the DNABERT layout: interior [UNK] tokens."""
    seqs = [s for s in _barcodes(shared_data, 3000) if "N" in s.strip("N")][:64]
    return ref.dnabert_batch(seqs, 512)


def _fraction(mask, special):
    return float(np.asarray(mask)[~special].mean())


def _reference_masks(strategy, centres_or_counts, ids, special, ranks, compat=False):
    rows = []
    for b in range(len(ids)):
        special_row, rank = ref.row_inputs(ids[b], ranks, compat)
        assert np.array_equal(special_row, special[b])
        if strategy == "genemask":
            rows.append(ref.genemask_row(centres_or_counts[b], special_row, rank, compat))
        else:
            rows.append(ref.global_pmi_row(int(centres_or_counts[b]), special_row, rank))
    return np.stack(rows)


def test_special_mask_marks_the_dnabert_specials(chr22):
    ids, special = chr22
    got = np.asarray(masking.special_mask(ids, range(VOCAB.num_specials)))
    assert np.array_equal(got, special)
    assert (ids[:, 0] == VOCAB.special_id("[CLS]")).all()
    np.testing.assert_array_equal(got.sum(axis=1), 512 - 505)


def test_random_span_rate_and_spans(chr22):
    ids, special = chr22
    fn = jax.jit(masking.random_span)
    masks = np.stack([np.asarray(fn(jax.random.fold_in(KEY, i), ids, special)) for i in range(4)])
    assert not masks[:, special].any()
    # 1 - (1 - 0.025)^6 = 14.1% away from the ends; DNABERT's "~15%"
    assert _fraction(masks, np.broadcast_to(special, masks.shape)) == pytest.approx(
        0.1405, abs=0.004
    )
    centres = np.asarray(masking.draw_centres(KEY, jnp.asarray(special), 0.025))
    expected = np.stack([ref.random_span_row(c, s) for c, s in zip(centres, special, strict=True)])
    np.testing.assert_array_equal(np.asarray(masking.span_mask(centres, special)), expected)


@pytest.mark.parametrize("compat", [False, "genemask", "cmgems"])
def test_genemask_equals_per_sequence_reference(chr22, barcodes_with_n, ranks, compat):
    fn = jax.jit(masking.genemask_from_centres, static_argnums=4)
    for ids, special in (chr22, barcodes_with_n):
        centres = np.asarray(masking.draw_centres(KEY, jnp.asarray(special), 0.0176))
        got = np.asarray(fn(centres, ids, special, ranks, compat))
        np.testing.assert_array_equal(
            got, _reference_masks("genemask", centres, ids, special, ranks, compat)
        )
        assert not got[special].any()


def test_rank_table_lookup_agrees_with_kmer_string_lookup(chr22, ranks):
    """The id-indexed rank table gives the ranks the released code finds through k-mer strings."""
    ids, special = chr22[0][:64], chr22[1][:64]
    centres = np.asarray(masking.draw_centres(KEY, jnp.asarray(special), 0.0176))
    by_kmer = ref.rank_by_kmer(ranks)
    expected = np.stack(
        [
            ref.genemask_row(c, *ref.row_inputs(i, by_kmer))
            for c, i in zip(centres, ids, strict=True)
        ]
    )
    got = masking.genemask_from_centres(centres, ids, special, ranks)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_genemask_rates_match_the_paper(shared_data, chr22, ranks):
    fn = jax.jit(masking.genemask)
    ids, special = chr22
    rates = [
        _fraction(fn(jax.random.fold_in(KEY, i), ids, special, ranks), special) for i in range(3)
    ]
    assert np.mean(rates) == pytest.approx(0.154, abs=0.005)  # ~15.4% at L ~ 506
    # short sequences: the "< 5 segments -> widen all" rule pushes the rate to ~17%
    ids, special = _gue(shared_data, "prom/prom_300_all", 2000, 310)
    assert _fraction(fn(KEY, ids, special, ranks), special) == pytest.approx(0.17, abs=0.006)


def test_genemask_widens_spans_on_the_best_ranked_tokens(chr22, ranks):
    """12 well-separated centres per row: 6 become 11-token runs centred on the best-ranked token
    of their 6-span, and those are the 6 best; the other 6 stay c-2..c+3."""
    ids, special = chr22[0][:128], chr22[1][:128]
    centres = np.zeros(ids.shape, bool)
    centres[:, 20:500:40] = True
    masks = np.asarray(masking.genemask_from_centres(centres, ids, special, ranks))
    token_ranks = ranks[ids]
    for mask, rank, row_centres in zip(masks, token_ranks, centres, strict=True):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        runs = list(zip(edges[::2], edges[1::2], strict=True))
        assert sorted(end - start for start, end in runs) == [6] * 6 + [11] * 6
        wide_best, narrow_best = [], []
        for c in np.flatnonzero(row_centres):
            start, end = next((s, e) for s, e in runs if s <= c < e)
            span = rank[c - 2 : c + 4]
            if end - start == 11:
                assert rank[start + 5] == span.min()
                wide_best.append(span.min())
            else:
                assert (start, end) == (c - 2, c + 4)
                narrow_best.append(span.min())
        assert max(wide_best) <= min(narrow_best)


@pytest.mark.parametrize("compat", [False, "cmgems"])
def test_global_pmi_equals_reference_and_covers_the_best_positions(chr22, ranks, compat):
    ids, special = chr22[0][:512], chr22[1][:512]
    counts = np.asarray(masking.draw_centres(KEY, jnp.asarray(special), 0.0136).sum(axis=1))
    got = np.asarray(masking.global_pmi_from_counts(counts, ids, special, ranks, compat))
    np.testing.assert_array_equal(
        got, _reference_masks("global_pmi", counts, ids, special, ranks, compat)
    )
    if not compat:
        positions = np.arange(1, 506)
        for mask, row_ids, k in zip(got, ids, counts, strict=True):
            best = positions[np.lexsort((positions, ranks[row_ids[positions]]))][:k]
            assert mask[best].all()


def test_global_pmi_rate(chr22, ranks):
    """k ~ Bin(505, 0.0136) windows of 11 would mask ~15% if disjoint; the best-ranked 6-mers of
    human DNA cluster (Alu / microsatellite repeats), so the windows overlap and ~12% is masked."""
    ids, special = chr22
    fn = jax.jit(masking.global_pmi)
    mask = np.asarray(fn(KEY, ids, special, ranks, 0.0136))
    counts = np.asarray(masking.draw_centres(KEY, jnp.asarray(special), 0.0136).sum(axis=1))
    assert counts.mean() * 11 / 505 == pytest.approx(0.15, abs=0.005)
    assert _fraction(mask, special) == pytest.approx(0.121, abs=0.006)
    assert not mask[special].any()


def test_b1_global_pmi_masks_the_same_positions_in_every_sequence(chr22, ranks):
    ids, special = chr22[0][:256], chr22[1][:256]
    counts = np.full(len(ids), 7, np.int32)
    got = np.asarray(masking.global_pmi_from_counts(counts, ids, special, ranks, "cmgems"))
    expected = np.zeros(512, bool)
    for centre in (5, 9, 278, 6, 346, 197, 345):  # rank(vocab[position]) order, reference §3
        expected[max(centre - 5, 1) : centre + 6] = True
    np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))
    assert _fraction(got, special) == pytest.approx(48 / 505)  # ~9.5%: windows at 5, 6, 9 overlap
    intended = np.asarray(masking.global_pmi_from_counts(counts, ids, special, ranks))
    assert len({row.tobytes() for row in intended}) > 250


def test_b1_genemask_depends_on_positions_only(chr22, ranks):
    ids, special = chr22[0][:256], chr22[1][:256]
    one_row = np.asarray(masking.draw_centres(KEY, jnp.asarray(special[:1]), 0.03))
    centres = np.broadcast_to(one_row, ids.shape)
    assert one_row.sum() >= 10
    compat = np.asarray(masking.genemask_from_centres(centres, ids, special, ranks, "cmgems"))
    intended = np.asarray(masking.genemask_from_centres(centres, ids, special, ranks))
    assert len({row.tobytes() for row in compat}) == 1
    assert len({row.tobytes() for row in intended}) > 100


def test_b3_high_set_is_the_first_half_not_the_best(chr22, ranks):
    """With B1 off but B3's unsorted high set, masks differ from the intended best-ranked half."""
    ids, special = chr22[0][:256], chr22[1][:256]
    centres = np.asarray(masking.draw_centres(KEY, jnp.asarray(special), 0.0176))
    m = centres.sum(axis=1)
    b3 = np.stack(
        [
            ref.genemask_row(c, s, ranks[i], compat=True)
            for c, s, i in zip(centres, special, ids, strict=True)
        ]
    )
    intended = np.asarray(masking.genemask_from_centres(centres, ids, special, ranks))
    differ = (b3 != intended).any(axis=1)
    assert not differ[m <= 8].any()  # all centres are widened either way
    assert differ[m >= 9].mean() > 0.5


def test_same_key_same_mask_and_jit_agrees_with_eager(chr22, ranks):
    ids, special = jnp.asarray(chr22[0][:64]), jnp.asarray(chr22[1][:64])
    calls = {
        "random_span": lambda k: masking.random_span(k, ids, special),
        "genemask": lambda k: masking.genemask(k, ids, special, ranks),
        "global_pmi": lambda k: masking.global_pmi(k, ids, special, ranks, 0.0136),
        "mae_drop": lambda k: masking.mae_drop(k, ids, special, 0.5),
        "mae_drop_fixed": lambda k: masking.mae_drop_fixed(k, ids, special, 0.5),
    }
    other = jax.random.fold_in(KEY, 1)
    for name, call in calls.items():
        eager = np.asarray(call(KEY))
        np.testing.assert_array_equal(np.asarray(jax.jit(call)(KEY)), eager, err_msg=name)
        np.testing.assert_array_equal(np.asarray(call(KEY)), eager, err_msg=name)
        assert (np.asarray(call(other)) != eager).any(), name


def test_corrupt_80_10_10(chr22, ranks):
    ids, special = chr22
    mask = np.asarray(masking.genemask(KEY, ids, special, ranks))
    inputs, targets, weights = map(
        np.asarray, masking.corrupt(KEY, ids, mask, VOCAB.size, VOCAB.mask_id)
    )
    np.testing.assert_array_equal(targets, ids)
    np.testing.assert_array_equal(weights, mask.astype(np.float32))
    assert weights.dtype == np.float32 and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[~mask], ids[~mask])
    masked_in, masked_orig = inputs[mask], ids[mask]
    n = masked_in.size
    assert n > 70_000
    is_mask = masked_in == VOCAB.mask_id
    replaced = ~is_mask & (masked_in != masked_orig)
    assert is_mask.mean() == pytest.approx(0.8, abs=0.006)
    assert replaced.mean() == pytest.approx(0.1 * (1 - 1 / VOCAB.size), abs=0.004)
    assert (masked_in == masked_orig).mean() == pytest.approx(0.1, abs=0.004)
    # the reference draws random ids from the whole tokenizer, specials included
    assert (masked_in[replaced] < VOCAB.num_specials).any()
    assert masked_in[replaced].max() < VOCAB.size
    inputs_k, _, _ = masking.corrupt(
        KEY, ids, mask, VOCAB.size, VOCAB.mask_id, random_low=VOCAB.num_specials
    )
    randoms = np.asarray(inputs_k)[mask & (np.asarray(inputs_k) != VOCAB.mask_id)]
    assert randoms.min() >= VOCAB.num_specials
    with pytest.raises(ValueError, match="mask_frac"):
        masking.corrupt(KEY, ids, mask, VOCAB.size, VOCAB.mask_id, mask_frac=0.95)


def test_corrupt_random_ids_are_uniform(chr22):
    """Random replacements hit every id equally often (chi-square over the vocabulary)."""
    ids, special = chr22
    mask = ~special
    counts, expected = np.zeros(VOCAB.size), np.zeros(VOCAB.size)
    others = mask.sum() - np.bincount(ids[mask], minlength=VOCAB.size)  # positions != each id
    for i in range(16):
        inputs = np.asarray(
            masking.corrupt(jax.random.fold_in(KEY, i), ids, mask, VOCAB.size, VOCAB.mask_id)[0]
        )
        randomized = mask & (inputs != ids) & (inputs != VOCAB.mask_id)
        counts += np.bincount(inputs[randomized], minlength=VOCAB.size)
        expected += 0.1 / VOCAB.size * others
    shown = np.arange(VOCAB.size) != VOCAB.mask_id  # a random [MASK] looks like a [MASK]
    chi2 = ((counts - expected)[shown] ** 2 / expected[shown]).sum()
    dof = shown.sum() - 1
    assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof)


@pytest.fixture(scope="module")
def barcode_batch(shared_data):
    """BarcodeBERT layout: 2000 real barcodes -> 110 non-overlapping 6-mers, [UNK]-padded."""
    ids, _ = KmerTokenizer(k=6, vocab="barcodebert").encode(_barcodes(shared_data, 2000), 110)
    return ids, np.asarray(masking.special_mask(ids, range(2)))


def test_mae_drop_rate_and_fixed_count(barcode_batch):
    ids, special = barcode_batch
    n_valid = (~special).sum(axis=1)
    assert n_valid.min() < n_valid.max()  # lengths vary, so the fixed count varies too
    mask = np.asarray(masking.mae_drop(KEY, ids, special, 0.5))
    assert not mask[special].any()
    assert _fraction(mask, special) == pytest.approx(0.5, abs=0.005)
    assert len(set(mask.sum(axis=1))) > 10
    fixed_fn = jax.jit(masking.mae_drop_fixed, static_argnums=3)
    for ratio in (0.5, 0.15):
        fixed = np.asarray(fixed_fn(KEY, ids, special, ratio))
        assert not fixed[special].any()
        np.testing.assert_array_equal(fixed.sum(axis=1), np.floor(ratio * n_valid + 0.5))
        bound = masking.visible_len(110, ratio)
        visible = (~fixed & ~special).sum(axis=1)
        assert visible.max() <= bound
        dropped = jnp.asarray(fixed | special)  # what the train step hands the MAE encoder
        _, positions, present = map(
            np.asarray, compact_visible(ids, jnp.ones_like(ids), dropped, bound)
        )
        assert positions.shape == (len(ids), bound)
        np.testing.assert_array_equal(present.sum(axis=1), visible)
        for row in range(0, len(ids), 97):
            expected = np.flatnonzero(~fixed[row] & ~special[row])
            np.testing.assert_array_equal(positions[row][present[row]], expected)
    assert masking.visible_len(110, 0.5) == 55
    # each maskable position is dropped with the same probability
    keys = jax.random.split(KEY, 200)
    draws = np.asarray(jax.vmap(lambda k: masking.mae_drop_fixed(k, ids[:1], special[:1]))(keys))
    draws = draws[:, 0]
    per_position = draws[:, ~special[0]].mean(axis=0)
    assert per_position.min() > 0.3 and per_position.max() < 0.7


def test_make_mask_switch_and_per_example(chr22, ranks):
    ids, special = jnp.asarray(chr22[0][:64]), jnp.asarray(chr22[1][:64])
    params = masking.MaskParams()
    make = jax.jit(masking.make_mask, static_argnames=("params", "active"))
    direct = [np.asarray(f(KEY, ids, special, ranks)) for f in masking.strategy_functions(params)]
    for index, expected in enumerate(direct):
        np.testing.assert_array_equal(
            np.asarray(make(KEY, index, ids, special, ranks, params)), expected
        )
    assert make._cache_size() == 1  # the strategy index is traced: no recompilation
    per_row = np.arange(64) % len(masking.STRATEGIES)
    got = np.asarray(make(KEY, per_row, ids, special, ranks, params))
    for row, index in enumerate(per_row):
        np.testing.assert_array_equal(got[row], direct[index][row])
    only = np.asarray(make(KEY, per_row, ids, special, ranks, params, (1, 2)))
    assert not only[per_row == 0].any()
    np.testing.assert_array_equal(only[per_row == 1], direct[1][per_row == 1])
    assert masking.strategy_index("global_pmi") == 2


def test_bad_inputs_raise_clear_errors(chr22, ranks):
    ids, special = chr22
    with pytest.raises(ValueError, match="reference_code_compat"):
        masking.genemask(KEY, ids, special, ranks, reference_code_compat="paper")
    with pytest.raises(ValueError, match=r"ids must be int\[B, L\]"):
        masking.random_span(KEY, ids[0], special[0])
    with pytest.raises(ValueError, match="special must have the ids' shape"):
        masking.random_span(KEY, ids, special[:, :-1])
    with pytest.raises(ValueError, match="unknown masking strategy"):
        masking.strategy_index("bert")
    with pytest.raises(ValueError, match="ratio must be in"):
        masking.visible_len(110, 1.5)


def test_cm_gems_and_cm_step_global_pmi_rates_follow_their_scripts(chr22, ranks):
    """CM-GEMS's hard phase takes args.mlm_probability = 0.0176 (GeneMask Script-A, the run
    script of the released CM-GEMS code), as the Global-PMI baseline; CM-STEP hard-codes 0.0136.
    Measured on 1,024 chr22 rows: ~15.1 % against ~12.1 % masked."""
    ids, special = chr22
    fn = jax.jit(masking.global_pmi)
    probs = {
        r: config.load(r).masking.global_pmi_prob for r in ("cm_gems", "cm_step", "global_pmi")
    }
    assert probs == {"cm_gems": 0.0176, "cm_step": 0.0136, "global_pmi": 0.0176}
    rates = {
        r: np.mean(
            [
                _fraction(fn(jax.random.fold_in(KEY, i), ids, special, ranks, p), special)
                for i in range(3)
            ]
        )
        for r, p in probs.items()
    }
    assert rates["cm_gems"] == pytest.approx(0.151, abs=0.006)
    assert rates["cm_step"] == pytest.approx(0.121, abs=0.006)


def test_genemask_2023_compat_is_six_spans_plus_one_stale_window(chr22, ranks):
    """The paper-era Code-B (fa0604f) widens around the stale loop variable: 6-spans for every
    centre and one 11-window around the last centre in set order, ~11.2 % masked on chr22."""
    ids, special = chr22
    fn = jax.jit(masking.genemask, static_argnums=5)
    rates = [
        _fraction(
            fn(jax.random.fold_in(KEY, i), ids, special, ranks, 0.0176, "genemask_2023"), special
        )
        for i in range(3)
    ]
    assert np.mean(rates) == pytest.approx(0.112, abs=0.004)
    centres = np.asarray(masking.draw_centres(KEY, jnp.asarray(special), 0.0176))
    got = np.asarray(masking.genemask_from_centres(centres, ids, special, ranks, "genemask_2023"))
    six = np.asarray(masking.span_mask(centres, special))
    assert (got >= six).all()
    for row in range(0, len(ids), 61):
        extra = np.flatnonzero(got[row] & ~six[row])
        last = max(np.flatnonzero(centres[row]), key=lambda c: (c % 32) * 512 + c)
        if 5 <= centres[row].sum() <= 20:  # table of 32 slots
            assert set(extra) <= set(range(last - 5, last + 6))
            window = slice(max(last - 5, 0), last + 6)
            assert got[row, window][~special[row, window]].all()


def test_unrolled_bisection_gives_the_same_masks():
    """The cost-estimate tracing (every bisection pass unrolled) computes the same mask."""
    rng = np.random.default_rng(0)
    keys = jnp.asarray(np.stack([rng.permutation(512) for _ in range(8)]).astype(np.int16))
    count = jnp.asarray(rng.integers(0, 60, 8).astype(np.int32))
    looped = jax.jit(lambda k, c: masking._smallest(k, c, 10))
    with masking.unrolled_bisection():
        unrolled = jax.jit(lambda k, c: masking._smallest(k, c, 10)).lower(keys, count)
    assert "while" in looped.lower(keys, count).as_text()
    assert "while" not in unrolled.as_text()
    expected = looped(keys, count)
    np.testing.assert_array_equal(unrolled.compile()(keys, count), expected)
    np.testing.assert_array_equal(expected.sum(axis=1), count)
