"""Which torch_npu builds carry which Ascend Extension for PyTorch release.

``torch_npu.__version__`` names the PyTorch line plus a post number (``2.6.0.post3``, ``2.6.0.post3+git1a2b3c4``),
not the release of its operators (op-plugin), and each release ships one build per PyTorch line. A kernel
therefore needs the first build of a release *on every line*: :data:`RELEASES` lists them, read from
``version.txt`` / ``setup.py`` at each ``Ascend/pytorch`` release tag and the README's CANN pairing table
(sources in ``/work/wt/torch_npu_ops.md`` section 6). A line newer than every listed one is newer than the
release; an older line that is not listed never received it.

Alpha tags reuse release version strings (``7.1.RC1.alpha002-pytorch2.7.1`` says ``2.7.1``), so kernels also
check that each op they call exists (``hasattr``) instead of trusting the string alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# release -> first torch_npu build of it on each PyTorch line
RELEASES: dict[str, tuple[str, ...]] = {
    "5.0.0": ("1.11.0.post8", "2.0.1.post1", "2.1.0"),  # npu_rms_norm first shipped
    "6.0.rc1": ("1.11.0.post11", "2.1.0.post3", "2.2.0"),  # npu_swiglu, npu_grouped_matmul (int[] group_list)
    "7.0.0": ("2.1.0.post12", "2.3.1.post6", "2.4.0.post4", "2.5.1"),  # Tensor group_list, rotary_mode
    "7.1.0": ("2.1.0.post13", "2.5.1.post1", "2.6.0"),  # npu_moe_token_permute/unpermute (no autograd)
    "7.2.0": ("2.1.0.post17", "2.6.0.post3", "2.7.1"),  # grouped matmul group_type=2, permute autograd
}

_VERSION = re.compile(r"^\s*(\d+)\.(\d+)\.(\d+)(?:\.?post(\d+))?")


def parse(version: str) -> tuple[tuple[int, int, int], int] | None:
    """``"2.6.0.post3+git1a2b3c4"`` -> ``((2, 6, 0), 3)``; ``None`` when the string is not a torch_npu version."""
    match = _VERSION.match(version)
    if match is None:
        return None
    major, minor, micro, post = match.groups()
    return (int(major), int(minor), int(micro)), int(post or 0)


@dataclass(frozen=True)
class Requirement:
    """The torch_npu builds that carry at least ``release``."""

    release: str

    @property
    def first_builds(self) -> tuple[str, ...]:
        return RELEASES[self.release]

    def satisfied_by(self, version: str) -> bool | None:
        """Whether ``version`` carries the release; ``None`` when the version string cannot be read."""
        parsed = parse(version)
        if parsed is None:
            return None
        line, post = parsed
        firsts = [parse(v) for v in self.first_builds]
        lines = {first_line: first_post for first_line, first_post in (f for f in firsts if f is not None)}
        if line in lines:
            return post >= lines[line]
        return line > max(lines)

    def problem(self, version: str | None) -> str | None:
        """Why ``version`` does not meet the requirement, in words for the report; ``None`` when it does."""
        if not version:
            return f"torch_npu has no __version__; needs release {self.release} ({self.describe()})"
        ok = self.satisfied_by(version)
        if ok is None:
            return f"cannot read torch_npu version {version!r}; needs release {self.release} ({self.describe()})"
        if not ok:
            return f"torch_npu {version} predates release {self.release} (needs {self.describe()})"
        return None

    def describe(self) -> str:
        newest = self.first_builds[-1]
        older = ", ".join(f"{v}+" for v in self.first_builds[:-1])
        return f"torch_npu >= {newest}" + (f", or on older PyTorch lines {older}" if older else "")

    def __str__(self) -> str:
        return f"release {self.release}: {self.describe()}"
