import pytest
import torch

from hfcompress.eval.fidelity import output_fidelity, report_lines


def test_classifier_outputs_cosine_agreement_and_difference():
    before = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.1]])
    after = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.1, 1.0]])  # the third row changes class
    f = output_fidelity(before, after, classifier=True)
    assert f.texts == 3 and f.agreement == pytest.approx(2 / 3)
    assert f.min_cosine == pytest.approx(torch.nn.functional.cosine_similarity(before[2], after[2], dim=0).item())
    assert f.max_difference == pytest.approx(1.0)
    assert "the same class for 66.7% of them" in f.describe()
    assert output_fidelity(before, after, classifier=False).agreement is None


def test_a_regressor_gets_its_largest_difference_only():
    # one score per text: its cosine would be its sign, and there is no class
    f = output_fidelity(torch.tensor([[0.5], [4.0]]), torch.tensor([[0.25], [4.5]]), classifier=True)
    assert f.cosine is None and f.agreement is None and f.max_difference == pytest.approx(0.5)
    assert f.describe() == "largest difference 0.5"


def test_report_lines_skip_headings_blanks_and_short_lines():
    text = " = Heading = \n\n a line of five words here \n two words\n another line with enough words in it\n"
    assert report_lines(text) == ["a line of five words here", "another line with enough words in it"]
    assert report_lines(text, count=1) == ["a line of five words here"]
