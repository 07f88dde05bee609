"""The README is the test plan: every command in its shell code blocks runs here, as written.

The commands run in README order, in one fresh copy of the checkout (what `git clone` gives a
user) in a temporary folder, with an environment that holds only ``PATH`` (this interpreter's
environment first, as after the README's install) and a fresh ``HOME``: no variable the README
does not tell a user to set, no Hugging Face cache, no network.

A command that needs what this machine lacks gets the smoke suffix of its row in ``ROWS``
(random or tiny weights, one short epoch, a local file the test writes first); no row ever adds
an override of paths, ``hydra.*``, logger or callbacks, since those would hide exactly the
failures a user meets. A command no row matches fails the suite, and so does a row that matches
no command: README and tests cannot drift apart.
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hf_decoders import write_decoder_hub_cache, write_tiny_decoder
from hf_encoders import write_hub_cache, write_tiny_encoder

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Random weights of a small GPT-2 (any `model=` keeps its name), one short epoch. The sizes only
# shrink what pretrained weights would fill; the code path is the default one.
TINY = (
    "model.weights=random model.n_layers=2 model.emb_dim=32 model.n_heads=2 "
    "trainer.max_epochs=1 trainer.limit_train_batches=3 trainer.limit_val_batches=2 eval_iter=1"
)
# IMDB from the test's small archive: the book's 35,000 / 5,000 / 10,000 need 50,000 reviews
IMDB = TINY + " data.train_size=100 data.val_size=20 data.test_size=40"
# An encoder: a tiny random one of its family, in ./my-encoder or in the Hugging Face cache where a
# first run would have downloaded it (`write_hub_caches`); one short epoch
ENCODER = "trainer.max_epochs=1 trainer.limit_train_batches=3 trainer.limit_val_batches=2 eval_iter=1"
# A sweep over different models: TINY's sizes with ++ (only the GPT-2 and decoder rows have these
# keys; the decoders' own sizes to match)
COMPARE = (TINY.replace("model.n_", "++model.n_").replace("model.emb_", "++model.emb_")
           + " ++model.n_kv_groups=1 ++model.head_dim=16 ++model.hidden_dim=64")
# A decoder (qwen3-0.6b, llama3.2-1b): the sizes of its tiny config, whose random checkpoint sits
# in ./Qwen3-0.6B-Base or in the Hugging Face cache (`write_hub_caches`); one short epoch
DECODER = ("model.vocab_size=50257 model.emb_dim=64 model.n_layers=2 model.n_heads=4 "
           "model.n_kv_groups=2 model.head_dim=16 model.hidden_dim=128 " + ENCODER)
HUB_DECODERS = {"Qwen/Qwen3-0.6B-Base": "qwen3", "meta-llama/Llama-3.2-1B": "llama"}
# the Hub ids of the compare rows and their families
HUB_ENCODERS = {
    "distilbert-base-uncased": "distilbert", "bert-large-uncased": "bert",
    "FacebookAI/roberta-large": "roberta", "microsoft/deberta-v3-base": "deberta-v2",
    "answerdotai/ModernBERT-base": "modernbert", "answerdotai/ModernBERT-large": "modernbert",
}


@dataclass
class Row:
    """How one README command runs here. ``how``:

    - ``run``: the command + ``suffix``, must exit 0;
    - ``compose``: composed, not run, by ``--cfg all`` (hardware or a launcher this machine has
      not: GPUs, SLURM); a sweep's first job is composed, since Hydra composes one job at a time;
    - ``ci``: not run (it is what CI does first); `.ci/run` must hold the same line;
    - ``collect``: pytest inside pytest would recurse: ``--collect-only`` checks the selection;
    - ``server``: started in the background until the block ends; ``ready`` is polled first;
    - ``define``: ``NAME=value`` evaluated once; later commands get ``$NAME`` in their environment.
    """

    pattern: str
    how: str = "run"
    suffix: str = ""
    why: str = ""
    ready: str = ""
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    expect: str = ""  # ``compose``: a line the composed config must hold


def _newest(work: Path, folder: str) -> Path:
    # the folders themselves: not the `latest` link, which names the newest *finished* run
    runs = sorted(p for p in (work / folder).iterdir() if p.is_dir() and not p.is_symlink())
    assert runs, f"no folder in {folder}"
    return runs[-1]


def _has_run_files(work: Path, _: subprocess.CompletedProcess) -> None:
    run = _newest(work, "outputs/runs")
    for name in ("metrics.json", "config.yaml", "train.log", "bundle/model.safetensors"):
        assert (run / name).is_file(), f"{run} has no {name}"


def _has_operating_point(work: Path, _: subprocess.CompletedProcess) -> None:
    run = _newest(work, "outputs/runs")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    bundle = json.loads((run / "bundle" / "bundle.json").read_text(encoding="utf-8"))
    assert metrics["threshold"] is not None and metrics["val_fpr_op"] <= 0.01, metrics
    assert bundle["operating_point"]["threshold"] == metrics["threshold"], bundle
    assert (run / "reliability.png").is_file()


def _has_summary(work: Path, _: subprocess.CompletedProcess) -> None:
    sweep = _newest(work, "outputs/multirun")
    summary = sweep / "summary.csv"
    assert summary.is_file(), f"{sweep} has no summary.csv"
    text = summary.read_text(encoding="utf-8")
    assert "failed" not in text, text


def _prints_labels(_: Path, proc: subprocess.CompletedProcess) -> None:
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines and all(line.split("\t")[0] in ("ham", "spam") or line.startswith("{")
                         for line in lines), proc.stdout


def _has_verdicts(work: Path, proc: subprocess.CompletedProcess) -> None:
    assert "vs row 2" in proc.stdout and "| baseline |" in proc.stdout, proc.stdout


def _has_probe(work: Path, proc: subprocess.CompletedProcess) -> None:
    folder = _newest(work, "outputs/probes")
    table = list(csv.DictReader((folder / "probe.csv").open()))
    assert {r["pooling"] for r in table} == {"last", "first", "flexible", "mean", "masked_mean"}
    assert len(table) == 5 * 3 and (folder / "probe.png").stat().st_size > 10_000  # emb + 2 blocks
    assert "masked_mean" in proc.stdout, proc.stdout


def _prints_mcnemar(_: Path, proc: subprocess.CompletedProcess) -> None:
    assert "McNemar exact p = " in proc.stdout and "[95% CI" in proc.stdout, proc.stdout


def _prints_json_prediction(_: Path, proc: subprocess.CompletedProcess) -> None:
    body = json.loads(proc.stdout)
    assert body["predictions"][0]["label"] in ("ham", "spam"), body


ROWS = [
    Row(r"^pip install torch==", "ci", why="installing takes minutes; .ci/run does it first"),
    Row(r"^pip install (-e|--no-deps)", "ci", why="installing takes minutes; .ci/run does it first"),
    Row(r"^python train\.py$", suffix=TINY, check=_has_run_files),
    Row(r"^python train\.py model\.weights=random$", suffix=TINY, check=_has_run_files),
    Row(r"^python train\.py model\.weights=random threshold\.max_fpr=0\.01$", suffix=TINY,
        check=_has_operating_point),
    Row(r"^python train\.py model=gpt2-tiny trainer\.max_epochs=1$",
        suffix="trainer.limit_train_batches=3 trainer.limit_val_batches=2 eval_iter=1",
        check=_has_run_files),
    Row(r"^python train\.py model=gpt2-medium$", suffix=TINY),
    # the training options (issue 26), one line each
    Row(r"^python train\.py (callbacks=early_stopping|scheduler=|data\.balance=|loss\.label_smoothing="
        r"|optimizer[=.]|model=gpt2-medium trainable=all model\.gradient_checkpointing=)",
        suffix=TINY, check=_has_run_files),
    Row(r"^python train\.py debug=(fdr|limit) ", suffix=TINY),
    Row(r"^python train\.py logger=csv$", suffix=TINY),
    Row(r"^python train\.py trainer\.max_epochs=1 trainer\.precision=bf16-mixed$", suffix=TINY),
    Row(r"^python train\.py trainer=gpu$", "compose", why="no GPU here", expect="accelerator: gpu"),
    Row(r"^python train\.py data\.source=SMSSpamCollection$", suffix=TINY,
        why="the test copies the data file into the folder first"),
    Row(r"^python train\.py model\.checkpoint=gpt2$",
        suffix="model=gpt2-tiny model.weights=pretrained trainer.max_epochs=1 "
        "trainer.limit_train_batches=3 trainer.limit_val_batches=2 eval_iter=1",
        why="the test writes a random gpt2-tiny-sized Hugging Face folder gpt2/ first"),
    Row(r"^pytest$", "collect", why="the suite is running it"),
    Row(r"^pytest -m slow$", "collect", why="the suite is running it"),
    Row(r"^pytest -m gpu$", "collect", why="no GPU here"),
    Row(r"^RUN=", "define"),
    Row(r"^SWEEP=", "define"),
    Row(r'^spam-classify "\$RUN" ', check=_prints_labels),
    Row(r'^spam-export "\$RUN" my-model$'),
    Row(r"^spam-classify my-model ", check=_prints_labels),
    Row(r"^python - <<", why="the README's Python example"),
    Row(r"^python scripts/summarize\.py \"\$SWEEP\"$"),
    Row(r"^python scripts/summarize\.py \"\$SWEEP\" --baseline 2$", check=_has_verdicts),
    Row(r'^python scripts/compare\.py "\$SWEEP/0" "\$SWEEP/1"$', check=_prints_mcnemar),
    Row(r"^python scripts/probe\.py model=gpt2-small model\.weights=random$", suffix=TINY, check=_has_probe),
    Row(r"^python scripts/generate\.py", suffix="model.weights=random",
        why="pretrained weights are unobtainable here"),
    Row(r"^python scripts/prepare_data\.py"),
    Row(r"^python scripts/benchmark\.py --quick", suffix="--model gpt2-tiny",
        why="gpt2-small would take minutes"),
    Row(r"^python train\.py -m hydra/launcher=submitit_slurm", "compose", why="no SLURM here",
        expect="submitit_launcher.SlurmLauncher"),
    Row(r"^python train\.py model=(logreg|majority)", check=_has_run_files),
    Row(r"^python train\.py model=encoder ", suffix=ENCODER, check=_has_run_files,
        why="a tiny random encoder: ./my-encoder, or the Hugging Face cache (no Hub here)"),
    Row(r"^python train\.py model=(qwen3|llama3\.2)-tiny debug=limit", check=_has_run_files),
    Row(r"^python train\.py model=(qwen3-0\.6b|llama3\.2-1b)", suffix=DECODER, check=_has_run_files,
        why="a tiny random decoder: ./Qwen3-0.6B-Base, or the Hugging Face cache (no Hub here)"),
    Row(r"^python train\.py -m 'experiment=glob\(compare/imdb", check=_has_summary,
        suffix=COMPARE + IMDB.removeprefix(TINY).replace(" data.", " ++data.")
        + " ++data.urls=[{serve}/aclImdb_v1.tar.gz]"),  # ++: the sweep's first compose is SMS
    Row(r"^python train\.py -m ('experiment=glob\(compare/|experiment=compare/)", suffix=COMPARE,
        check=_has_summary),
    Row(r"^python train\.py -m 'experiment=glob", suffix=TINY, check=_has_summary),
    Row(r"^python train\.py -m hydra/launcher=joblib .* seed=1,2,3$", suffix=TINY,
        check=_has_summary),
    Row(r"^python train\.py -m ", suffix=TINY, check=_has_summary),
    Row(r"^python train\.py hparams_search=optuna", suffix=TINY, check=_has_summary),
    Row(r"^python train\.py trainer=ddp trainer\.accelerator=cpu", suffix=TINY),
    Row(r"^python train\.py trainer=(ddp|fsdp) trainer\.devices=4$", "compose", why="no GPUs here",
        expect="devices: 4"),
    Row(r"^python train\.py data=csv ", suffix=TINY, check=_has_run_files,
        why="the test writes the CSV files first"),
    Row(r"^python train\.py data=imdb data\.source=", suffix=IMDB, check=_has_run_files,
        why="the test writes a small aclImdb_v1.tar.gz first"),
    Row(r"^python train\.py data=imdb", suffix=IMDB + " data.urls=[{serve}/aclImdb_v1.tar.gz]",
        check=_has_run_files, why="no network: a local server has the test's archive"),
    Row(r"^python train\.py experiment=chapter seed=1 hydra\.run\.dir=\S+$", suffix=TINY),
    Row(r"^python train\.py experiment=chapter seed=1 hydra\.run\.dir=\S+ ckpt_path=last$",
        suffix=TINY, check=_has_run_files),
    Row(r"^spam-serve \"\$RUN\"$", "server", ready="http://127.0.0.1:8000/api/health"),
    Row(r"^curl -s localhost:8000/api/classify", check=_prints_json_prediction),
    Row(r"^spam-serve \"\$RUN\" --port 8080", "server", ready="http://127.0.0.1:8080/api/health"),
    Row(r"^tensorboard --logdir outputs$", "server", ready="http://localhost:6006/"),
]


# The README commands the default `pytest` runs: one path through the README (train, classify,
# the Python example, a sweep and its summary, a CSV with text labels, the web demo). Every other
# command runs under `pytest -m slow` (CI runs both), in the same order and the same folder.
DEFAULT_RUN = {
    "pip install torch==2.13.0",
    'pip install -e ".[dev]"',
    "pip install --no-deps llms-from-scratch==1.0.19",
    "python train.py",
    "RUN=$(readlink -f outputs/runs/latest)",
    'spam-classify "$RUN" "first message" "second message" --json',
    "python train.py -m trainable=last_layer,last_block token=last,flexible",
    "SWEEP=$(ls -d outputs/multirun/* | tail -n 1)",
    'python scripts/summarize.py "$SWEEP"',
    'python scripts/summarize.py "$SWEEP" --baseline 2',
    'python scripts/compare.py "$SWEEP/0" "$SWEEP/1"',
    "python scripts/prepare_data.py --data-dir data/sms_spam",
    "python train.py data=csv data.train=train.csv data.validation=val.csv data.test=test.csv "
    "data.text_column=review data.label_column=topic",
    'spam-serve "$RUN"',
}


@dataclass
class Command:
    block: int
    text: str
    lang: str


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a ``#`` after a blank, outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    """Every shell command of the README's ```bash blocks (continuations joined, comments cut),
    and every ```python block as one command."""
    commands = []
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.M | re.S)
    for number, (lang, body) in enumerate(blocks):
        if lang == "python":
            commands.append(Command(number, f"python - <<'PYEOF'\n{body}PYEOF", lang))
            continue
        if lang not in ("bash", "sh", "shell"):
            continue
        pending = ""
        for raw in body.splitlines():
            line = _strip_comment(raw) if not pending else _strip_comment(" " + raw.strip())
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            line = (pending + line.strip()).strip()
            pending = ""
            if line:
                commands.append(Command(number, " ".join(line.split()), lang))
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def _row_for(command: Command) -> Row:
    rows = [row for row in ROWS if re.search(row.pattern, command.text)]
    assert rows, f"README command has no row in tests/test_readme.py ROWS: {command.text}"
    return rows[0]


def _is_default(command: Command) -> bool:
    """In the default run: named in DEFAULT_RUN, the README's Python example, or a request to a
    server that a default command started."""
    return command.text in DEFAULT_RUN or command.lang == "python" or command.text.startswith("curl")


def test_every_readme_command_has_a_row_and_every_row_a_command() -> None:
    assert len(COMMANDS) > 20, "the README's shell blocks were not found"
    used = {id(_row_for(c)) for c in COMMANDS}
    unused = [row.pattern for row in ROWS if id(row) not in used]
    assert not unused, f"rows that match no README command (remove them): {unused}"
    texts = {c.text for c in COMMANDS}
    missing = sorted(DEFAULT_RUN - texts)
    assert not missing, f"DEFAULT_RUN names commands the README no longer has: {missing}"


def _first_job(command: str) -> str:
    """A multirun command as its first job: without ``-m``, each swept value its first one."""
    from spam_lightning.train import expand_nested_globs

    argv = shlex.split(command)
    head, args = argv[:2], [a for a in argv[2:] if a not in ("-m", "--multirun")]
    args = [re.sub(r"^([^=\[]+)=([^\[\]]*?),.*$", r"\1=\2", a) for a in expand_nested_globs(args)]
    return shlex.join(head + args)


def _readme_env(home: Path) -> dict[str, str]:
    """What a user has after the README's install: the environment's bin first, a HOME."""
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home)}


def _write_inputs(work: Path, sms_file: Path) -> None:
    """The local files some commands name instead of a download (see the rows' ``why``)."""
    shutil.copy(sms_file, work / "SMSSpamCollection")
    (work / "messages.txt").write_text(
        "Hey, are we still on for dinner?\nWIN a FREE prize! Call 0800 now\n", encoding="utf-8")
    (work / "messages.csv").write_text(
        "id,Text\n1,See you at 8\n2,\"URGENT! You have won a 1 week FREE membership\"\n",
        encoding="utf-8")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(work / "gpt2")
    topics = {
        "sports": ["the match ended in a draw", "a late goal won the cup", "the team signed a striker"],
        "politics": ["the vote was delayed again", "parliament passed the bill", "a new minister"],
        "tech": ["the phone got a faster chip", "a bug in the new update", "the app now syncs"],
    }
    for name, copies in (("train", 8), ("val", 2), ("test", 2)):
        rows = ["review,topic"] + [
            f'"{text} {i}",{label}' for i in range(copies)
            for label, texts in topics.items() for text in texts
        ]
        (work / f"{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (work / "all.csv").write_text(
        "text,label\n" + "".join(f"message number {i},{'ab'[i % 2]}\n" for i in range(60)),
        encoding="utf-8",
    )
    with tarfile.open(work / "aclImdb_v1.tar.gz", "w:gz") as tar:
        for split in ("train", "test"):
            for label in ("pos", "neg"):
                folder = work / "_imdb" / "aclImdb" / split / label
                folder.mkdir(parents=True)
                for i in range(40):
                    word = "great" if label == "pos" else "awful"
                    (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(
                        f"a {word} film, number {i}", encoding="utf-8")
        tar.add(work / "_imdb" / "aclImdb", arcname="aclImdb")
    shutil.rmtree(work / "_imdb")
    write_tiny_encoder(work / "my-encoder", "bert")
    write_tiny_decoder(work / "Qwen3-0.6B-Base", "qwen3")


def write_hub_caches(home: Path) -> None:
    """Every encoder and decoder of the compare rows, tiny and random, in the Hugging Face cache."""
    for repo_id, family in HUB_ENCODERS.items():
        write_hub_cache(home, repo_id, family)
    for repo_id, arch in HUB_DECODERS.items():
        write_decoder_hub_cache(home, repo_id, arch)


def _fresh_checkout(root: Path, sms_file: Path) -> Path:
    """A fresh copy of the checkout: what a user has after `git clone`, nothing generated."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    _write_inputs(root, sms_file)
    return root


class Servers:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


class Session:
    """The user's shell session in one fresh checkout: environment, variables defined so far,
    servers running, and a local file server for the commands that would download."""

    def __init__(self, root: Path, sms_file: Path) -> None:
        self.work = _fresh_checkout(root / "spam-lightning", sms_file)
        self.env = _readme_env(root / "home")
        write_hub_caches(root / "home")
        self.block: int | None = None
        self.servers = Servers()
        self.files = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(self.work)))
        threading.Thread(target=self.files.serve_forever, daemon=True).start()
        self.serve = f"http://127.0.0.1:{self.files.server_address[1]}"

    def close(self) -> None:
        self.servers.stop()
        self.files.shutdown()
        self.files.server_close()


@pytest.fixture(scope="module")
def default_session(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Iterator[Session]:
    session = Session(tmp_path_factory.mktemp("readme-default"), sms_file)
    yield session
    session.close()


@pytest.fixture(scope="module")
def full_session(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> Iterator[Session]:
    session = Session(tmp_path_factory.mktemp("readme-all"), sms_file)
    yield session
    session.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"server exited with {proc.returncode} before {url} answered:\n{out}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s")


def _run(text: str, work: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", text], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (
        f"`{text}` exited with {proc.returncode}\nSTDOUT\n{proc.stdout[-4000:]}\n"
        f"STDERR\n{proc.stderr[-6000:]}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    return proc


def _ids(commands: list[Command]) -> list[str]:
    return [f"{c.block}:{c.text.splitlines()[0][:60]}" for c in commands]


DEFAULT_COMMANDS = [c for c in COMMANDS if _is_default(c)]


@pytest.mark.parametrize("command", DEFAULT_COMMANDS, ids=_ids(DEFAULT_COMMANDS))
def test_readme_default_path(command: Command, default_session: Session) -> None:
    """One path through the README, in the default `pytest`."""
    _execute(command, default_session)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_readme_every_command(command: Command, full_session: Session) -> None:
    """Every README command in order, in a checkout of its own (`pytest -m slow`)."""
    _execute(command, full_session)


def _execute(command: Command, session: Session) -> None:
    row = _row_for(command)
    work, env = session.work, session.env
    if session.block != command.block:  # servers live until their block ends
        session.servers.stop()
        session.block = command.block
    text = command.text
    if row.how == "ci":
        assert text in (REPO / ".ci" / "run").read_text(encoding="utf-8"), (
            f"README says `{text}`, .ci/run does not")
    elif row.how == "collect":
        proc = _run(f"{text} --collect-only -q -p no:cacheprovider", work, env)
        assert re.search(r"\d+ tests? collected|no tests collected", proc.stdout), proc.stdout[-2000:]
    elif row.how == "compose":
        proc = _run(f"{_first_job(text)} --cfg all", work, env, timeout=120)
        assert row.expect in proc.stdout, proc.stdout[-3000:]
    elif row.how == "define":
        name, _, _ = text.partition("=")
        value = _run(f'{text}; printf %s "${name}"', work, env).stdout
        assert value, f"`{text}` gave an empty ${name}"
        env[name] = value
    elif row.how == "server":
        proc = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        session.servers.procs.append(proc)
        _wait_for(row.ready, proc)
    else:
        suffix = row.suffix.replace("{serve}", session.serve)
        proc = _run(f"{text} {suffix}".strip(), work, env)
        if row.check is not None:
            row.check(work, proc)


def _readme_line(start: str) -> str:
    (text,) = {c.text for c in COMMANDS if c.text.startswith(start)}
    return text


@pytest.mark.slow
def test_the_readme_run_names_the_newest_finished_run(tmp_path: Path) -> None:
    """The README's own `python train.py` fails without network and leaves a run folder; the
    README's `RUN=` line then still names the run that finished before it, and its
    `spam-classify` line works (before: `ls -d outputs/runs/* | tail -n 1` named the failed one)."""
    work, env = tmp_path / "work", _readme_env(tmp_path / "home")
    work.mkdir()
    shutil.copy(REPO / "train.py", work / "train.py")
    smoke = _readme_line("python train.py model=gpt2-tiny trainer.max_epochs=1")
    _run(f"{smoke} {_row_for(Command(0, smoke, 'bash')).suffix}", work, env)
    failed = subprocess.run(["bash", "-c", "python train.py"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "Error: model.weights=pretrained" in failed.stderr
    folders = sorted(p.name for p in (work / "outputs" / "runs").iterdir())
    assert len(folders) == 3 and folders[1].endswith("-failed"), folders  # the run, the failed, latest
    line = _readme_line("RUN=")
    name = line.partition("=")[0]
    env[name] = _run(f'{line}; printf %s "${name}"', work, env).stdout
    classify = _readme_line('spam-classify "$RUN" "first message"')
    _prints_labels(work, _run(classify, work, env))


def _sample_after(marker: str) -> str:
    """The README's first ```text block after ``marker``: a sample output."""
    text = README.read_text(encoding="utf-8")
    block = re.compile(r"^```text\n(.*?)^```", re.M | re.S).search(text, text.index(marker))
    assert block, f"no ```text block after {marker!r} in README.md"
    return block.group(1)


def _readme_command(text: str) -> str:
    assert text in {c.text for c in COMMANDS}, f"README.md has no command `{text}`"
    return text


# the README's sample outputs: the chapter run's printout, classify's line, curl's answer
CHAPTER_SAMPLE = "what `python train.py model.weights=random`"
CLASSIFY_SAMPLE = "With the random-init gpt2-small run above, the first command printed"
CURL_SAMPLE = "The `curl` line, against that same run, answered"


@pytest.mark.slow  # the chapter run: gpt2-small, random weights, 5 epochs (about 5 minutes idle)
def test_readme_samples_come_from_the_chapter_run(tmp_path: Path) -> None:
    """The README's samples are what its commands print (issue 29, item 3): its chapter run as
    written, then its `RUN=` line, its first `spam-classify` line and its `spam-serve` + `curl`
    against that run. Compared exactly, except the run's duration and the last digits of curl's
    probabilities (full float precision, which another CPU's kernels may round otherwise)."""
    work, env = tmp_path / "work", _readme_env(tmp_path / "home")
    work.mkdir()
    shutil.copy(REPO / "train.py", work / "train.py")
    proc = _run(_readme_command("python train.py model.weights=random"), work, env, timeout=3600)
    printed = [line for line in proc.stdout.splitlines()
               if re.match(r"(Ep \d|Training|Validation|Test) ", line)
               and not line.startswith("Training completed in ")]
    sample = [line for line in _sample_after(CHAPTER_SAMPLE).splitlines()
              if not line.startswith("Training completed in ")]
    assert printed == sample, "\n".join(printed)

    line = _readme_line("RUN=")
    env["RUN"] = _run(f'{line}; printf %s "$RUN"', work, env).stdout
    shown = _run(_readme_line('spam-classify "$RUN" "You are a winner'), work, env).stdout

    serve = _readme_command('spam-serve "$RUN"')
    servers = Servers()
    try:
        servers.procs.append(subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=work, env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True))
        _wait_for("http://127.0.0.1:8000/api/health", servers.procs[0])
        answer = _run(_readme_line("curl -s localhost:8000/api/classify"), work, env).stdout
    finally:
        servers.stop()
    # both compared, then both shown: what the README's samples should be
    same_line = shown == _sample_after(CLASSIFY_SAMPLE)
    same_answer = _close(json.loads(answer), json.loads(_sample_after(CURL_SAMPLE)))
    assert same_line and same_answer, f"spam-classify printed:\n{shown}\ncurl answered:\n{answer}"


def _close(got: object, want: object) -> bool:
    """Equal JSON, floats within 1e-6."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(
            _close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(
            _close(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, float):
        return isinstance(got, float) and abs(got - want) <= 1e-6
    return got == want
