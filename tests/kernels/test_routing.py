"""The grouped kernel's choice between a GEMV per row and sorted tensor-core blocks (`routing.grouped_block_m`)."""

import pytest

from moecompress.kernels.routing import MAX_GEMV_ROWS, TC_BLOCK_IN_ROWS, grouped_block_m, max_blocks


@pytest.mark.parametrize("experts,top_k", [(8, 2), (64, 6), (128, 8), (256, 8)])
def test_decode_steps_of_up_to_eight_tokens_take_the_gemv(experts, top_k):
    for tokens in (1, 2, 4, 8):
        assert grouped_block_m(tokens * top_k, experts) == 1
    assert grouped_block_m(16 * top_k, experts) > 1


def test_the_choice_follows_the_cost_model():
    """GEMV while rows <= TC_BLOCK_IN_ROWS x the experts the rows are expected to reach, never past
    MAX_GEMV_ROWS; a block of 16 while an active expert gets at most 16 rows, then 32 and 64."""
    for E in (4, 8, 16, 64, 128, 256):
        for R in range(1, 600):
            active = E * (1 - (1 - 1 / E) ** R)
            gemv = R <= 2 or (R <= MAX_GEMV_ROWS and R <= TC_BLOCK_IN_ROWS * active)
            bm = grouped_block_m(R, E)
            assert (bm == 1) == gemv, (E, R, bm)
            if bm > 1:
                per = R / min(R, E)
                assert bm == (16 if per <= 16 else 32 if per <= 32 else 64)
                assert max_blocks(R, E, bm) * bm >= R  # every row has a block slot


def test_one_or_two_rows_never_sorted():
    for E in (2, 8, 1000):
        assert grouped_block_m(1, E) == grouped_block_m(2, E) == 1
