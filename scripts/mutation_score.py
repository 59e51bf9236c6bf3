"""The mutation score of the last `scripts/mutation.sh` run (its pass folders as arguments).

Score = killed / (all mutants - wording-only mutants). A surviving mutant counts as
wording-only when the only thing it changes is the text inside a string literal that is
prose (it contains a space: a problem or error message, a note); a mutant of an
identifier-like string (a step, a key, an action) always counts. Timeouts count as killed
(the tests did not pass). The survivors are listed in survivors.txt in each pass folder.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path

STRING = re.compile(r"""(?:[rbuf]|rb|br|fr|rf)?("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""", re.I)


def _changed_lines(diff: str) -> tuple[list[str], list[str]]:
    removed = [ln[1:] for ln in diff.splitlines()
               if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:] for ln in diff.splitlines()
             if ln.startswith("+") and not ln.startswith("+++")]
    return removed, added


def wording_only(diff: str) -> bool:
    removed, added = _changed_lines(diff)
    if not removed or len(removed) != len(added):
        return False
    for old, new in zip(removed, added, strict=True):
        if STRING.sub('""', old) != STRING.sub('""', new):
            return False  # code changed, not only a string's text
        old_strings = [m.group(1) for m in STRING.finditer(old)]
        new_strings = [m.group(1) for m in STRING.finditer(new)]
        changed = [o for o, n in zip(old_strings, new_strings, strict=False) if o != n]
        if not changed or not all(" " in s for s in changed):
            return False
    return True


def score_of(folder: Path) -> tuple[Counter[str], int, dict[str, Counter[str]]]:
    """Statuses, wording-only count and per-file statuses of one pass (its own config)."""
    os.chdir(folder)
    # mutmut reads its configuration from the working folder, once: import it from there
    import mutmut.configuration as configuration

    configuration._config = None
    from mutmut.__main__ import get_diff_for_mutant, walk_mutatable_files
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    statuses: Counter[str] = Counter()
    wording = 0
    survivors: list[str] = []
    per_file: dict[str, Counter[str]] = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            if status in ("survived", "no tests"):
                diff = get_diff_for_mutant(name, path=path)
                if wording_only(diff):
                    status = "wording only"
                    wording += 1
                else:
                    survivors.append(f"# {name}: {status}\n{diff}\n")
            statuses[status] += 1
            per_file.setdefault(str(path), Counter())[status] += 1
    Path("survivors.txt").write_text("".join(survivors), encoding="utf-8")
    return statuses, wording, per_file


def main(folders: list[str]) -> int:
    statuses: Counter[str] = Counter()
    wording = 0
    for folder in folders:
        if not (Path(folder) / "mutants").is_dir():
            print(f"{folder}: no mutation results (run scripts/mutation.sh first)")
            return 1
        got, words, per_file = score_of(Path(folder).resolve())
        statuses += got
        wording += words
        for path, counts in sorted(per_file.items()):
            print(f"{path}: {dict(counts)}")
        print(f"  survivors: {Path(folder, 'survivors.txt')}")
    total = sum(statuses.values())
    killed = statuses["killed"] + statuses["timeout"]
    unchecked = statuses["not checked"]
    counted = total - wording - unchecked
    print(f"mutants: {total}; not checked: {unchecked}; wording-only (equivalent): "
          f"{wording}; killed {killed} of {counted} = {100 * killed / max(counted, 1):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["."]))
