"""Job scripts: golden files per backend, quoting that cannot be forgotten, hostile inputs, site overrides.

Regenerate the golden files after an intended template change with
``RANNC_UPDATE_GOLDEN=1 python -m pytest -q tests/test_scheduler_templates.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from rannc_cli.errors import RanncError
from rannc_cli.scheduler.backends.pbs import directive_options
from rannc_cli.scheduler.spec import JobSpec, job_name, parse_time, resolve_spec, slurm_time
from rannc_cli.scheduler.submit import render_scripts
from rannc_cli.scheduler.templates import TemplateQuotingError, render

GOLDEN = Path(__file__).parent / "data" / "scheduler" / "golden"
JOB_DIR = "/home/alice/logs/20260101-120000-bert-0123abcd"


def spec(**kw) -> JobSpec:
    base = dict(name="bert", backend="slurm", script="/home/alice/src/train.py", script_args=["--lr", "0.1"],
                nodes=4, gpus=8, device="auto", queue="gpu", account="proj42", time_seconds=2 * 3600,
                modules=["cuda/12.4", "nccl"], setup=["source /home/alice/venv/bin/activate"],
                python="/home/alice/venv/bin/python", workdir="/home/alice/src", mem_per_gpu=85899345920,
                signal_seconds=120, env={"NCCL_DEBUG": "WARN"})
    base.update(kw)
    return JobSpec(**base)


CASES = {
    "slurm": spec(),
    "pbs": spec(backend="pbs", queue="h-regular", account="gk77", account_option="-W group_list=<group>", gpus=2,
                mem_per_gpu=17179869184),
    "pbs-abci": spec(backend="pbs", queue="rt_HF", account="gaa50000", account_option="-P <group>",
                     directives=["-l USE_SSH=1"],
                     mpi="mpirun --hostfile $PBS_NODEFILE --map-by ppr:${RANNC_GPUS_PER_NODE}:node"),
    "pjm": spec(backend="pjm", queue="regular-a", account="gz00", gpus=8, modules=["cuda", "ompi"],
                mpi="mpiexec -machinefile $PJM_O_NODEINF -npernode ${RANNC_GPUS_PER_NODE}"),
    "nqsv": spec(backend="nqsv", queue="gen_S", account="PROJ01", nodes=2, gpus=1, cpus_per_gpu=48, modules=[]),
    "sge": spec(backend="sge", queue="gpu.q", account="proj42", gpus=4, nodes=2,
                scheduler_options={"pe": "smp", "pe_multinode": "mpi4"}),
    "sge-tsubame": spec(backend="sge", site="tsubame-4.0", queue=None, account="tga-lab", account_option="-g <group>",
                        gpus=4, nodes=2, modules=["cuda", "openmpi"],
                        scheduler_options={"resource_types": {4: "node_f", 2: "node_h", 1: "node_q"},
                                           "launcher": "mpirun -npernode {gpus} -n {ranks} -x LD_LIBRARY_PATH"}),
    "local": spec(backend="local", nodes=1, gpus=4, queue=None, account=None, time_seconds=None, modules=[], setup=[],
                  mem_per_gpu=None, env={}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_scripts(case):
    scripts = render_scripts(CASES[case], "0123abcd", JOB_DIR, "cafe0123")
    for fname, text in scripts.items():
        golden = GOLDEN / f"{case}-{fname}"
        if os.environ.get("RANNC_UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert golden.is_file(), f"missing golden file {golden}; run with RANNC_UPDATE_GOLDEN=1"
        assert text == golden.read_text(), f"{fname} of {case} differs from {golden.name} (RANNC_UPDATE_GOLDEN=1 to accept)"
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, f"{case}-{fname} is not valid bash"


def test_pbs_pro_syntax():
    text = render_scripts(CASES["pbs"], "0123abcd", JOB_DIR, "k")["train.sh"]
    lines = [line for line in text.splitlines() if line.startswith("#PBS")]
    assert "#PBS -l select=4:ncpus=2:ngpus=2:mpiprocs=2" in lines
    assert "#PBS -l walltime=2:00:00" in lines
    assert "#PBS -W group_list=gk77" in lines and "#PBS -q h-regular" in lines and "#PBS -r y" in lines
    # no site MPI: one rank per PBS_NODEFILE line through PBS's task launch; the site's MPI where it names one
    assert "pbs_tmrsh" in text and "mpiexec" not in text and "mpirun" not in text
    abci = render_scripts(CASES["pbs-abci"], "0123abcd", JOB_DIR, "k")["train.sh"]
    assert "mpirun --hostfile $PBS_NODEFILE --map-by ppr:${RANNC_GPUS_PER_NODE}:node -n 32 bash" in abci
    assert '"$TMRSH" "$host" bash' not in abci
    assert "#PBS -P gaa50000" in abci and "group_list" not in abci and "#PBS -l USE_SSH=1" in abci
    # qsub gets the same request as options; -l lines merged into one (what Slurm's wrappers need)
    opts = directive_options(text)
    assert opts[-2:] == ["-l", "select=4:ncpus=2:ngpus=2:mpiprocs=2,place=scatter,walltime=2:00:00"]
    assert ["-N", "bert-train"] == opts[:2]


def test_slurm_directives_and_requeue():
    text = render_scripts(CASES["slurm"], "0123abcd", JOB_DIR, "k")["train.sh"]
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --time=02:00:00",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue"):
        assert line in text.splitlines()
    assert "srun --kill-on-bad-exit=1" in text and "scontrol requeue" in text and "module load cuda/12.4" in text
    no_requeue = render_scripts(spec(requeue=False), "x", JOB_DIR, "k")["train.sh"]
    assert "#SBATCH --signal" not in no_requeue and "#SBATCH --requeue" not in no_requeue


HOSTILE = ["'; touch {p}; echo '", "$(touch {p})", "`touch {p}`", "a b\nc", '"; touch {p}; "', "\\", "--x=$HOME",
           "*", "-", ""]


def test_hostile_strings_reach_the_script_verbatim(tmp_path):
    """Render with hostile arguments, env values and paths, then RUN the rank line under bash."""
    pwned = tmp_path / "pwned"
    args = [h.format(p=pwned) for h in HOSTILE]
    weird = tmp_path / "dir with 'quotes' and $x"
    weird.mkdir()
    script = weird / "echo args.py"
    script.write_text("import json, os, sys\nprint(json.dumps({'argv': sys.argv[1:], 'env': os.environ['HOSTILE']}))\n")
    import sys as _sys

    s = spec(script=str(script), script_args=args, env={"HOSTILE": args[0] + args[1]}, workdir=str(weird),
             python=_sys.executable, name=job_name("x'; touch /tmp/p #"))
    scripts = render_scripts(s, "0123abcd", str(weird), "k")
    exports = [line for line in scripts["train.sh"].splitlines() if line.startswith("export HOSTILE=")]
    assert len(exports) == 1   # the train script's own export line, run as rendered
    env = {**os.environ, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    out = subprocess.run(["bash", "-c", exports[0] + "\n" + scripts["rank.sh"]], capture_output=True, text=True,
                         env=env, cwd=weird)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["argv"] == args and got["env"] == args[0] + args[1]
    assert not pwned.exists()
    train = render_scripts(s, "0123abcd", str(weird), "k")["train.sh"]
    assert subprocess.run(["bash", "-n"], input=train, text=True).returncode == 0
    assert "#SBATCH --job-name=x-touch-tmp-p-train" in train    # names are reduced to safe characters


def test_directive_values_are_refused_not_quoted(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("print(1)\n")
    for flag in ({"queue": "gpu\n#SBATCH --uid=0"}, {"account": "a b"}, {"queue": "q;rm"}):
        with pytest.raises(RanncError, match="cannot go into a job script directive"):
            resolve_spec(script=script, script_args=[], nodes=1, gpus=1, scheduler="slurm", **flag)


def test_a_template_cannot_print_an_unquoted_string(tmp_path, monkeypatch):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "bad.sh.j2").write_text("echo {{ spec.script }}\n")
    (tmp_path / "slurm" / "undef.sh.j2").write_text("echo {{ nothing | q }}\n")
    monkeypatch.setenv("RANNC_TEMPLATES_DIR", str(tmp_path))
    with pytest.raises(TemplateQuotingError, match="without a quoting filter"):
        render("slurm", "bad.sh.j2", {"spec": spec()})
    with pytest.raises(RanncError, match="undefined"):
        render("slurm", "undef.sh.j2", {"spec": spec()})


def test_site_template_override(tmp_path, monkeypatch):
    """A site config's submit.templates folder overrides one template; the others stay the project's."""
    tdir = tmp_path / "mysite-templates" / "slurm"
    tdir.mkdir(parents=True)
    (tdir / "rank.sh.j2").write_text("#!/bin/bash\n# site rank script\nexec numactl -l {{ spec.python | q }} "
                                     "{{ spec.script | q }} {{ spec.script_args | qjoin }}\n")
    site = tmp_path / "mysite.yaml"
    site.write_text(f"name: mysite\nscheduler: slurm\ndefault_queue: gpu\nmodules: [cuda]\n"
                    f"node_groups: [{{name: g, count: 2, gpus: 4, gpu_memory_bytes: 42949672960}}]\n"
                    f"submit:\n  templates: {tmp_path / 'mysite-templates'}\n  setup: ['source /opt/env.sh']\n"
                    f"  directives: ['--constraint=a100']\n  time: '1:00:00'\n  max_time: '24:00:00'\n")
    script = tmp_path / "t.py"
    script.write_text("print(1)\n")
    s = resolve_spec(script=script, script_args=["--x"], nodes=2, gpus=4, site=str(site))
    assert (s.backend, s.queue, s.time_seconds, s.mem_per_gpu) == ("slurm", "gpu", 3600, 42949672960)
    scripts = render_scripts(s, "id", JOB_DIR, "k")
    assert "# site rank script" in scripts["rank.sh"] and "numactl -l" in scripts["rank.sh"]
    assert "#SBATCH --constraint=a100" in scripts["train.sh"] and "source /opt/env.sh" in scripts["train.sh"]
    assert "module load cuda" in scripts["profile.sh"]
    with pytest.raises(RanncError, match="exceeds site mysite's limit"):
        resolve_spec(script=script, script_args=[], nodes=2, gpus=4, site=str(site), time="2-00:00:00")


@pytest.mark.parametrize("text,seconds", [("2:00:00", 7200), ("30:00", 1800), ("1-00:00:00", 86400), ("90", 5400),
                                          ("90m", 5400), ("2h", 7200), ("45s", 45), ("1-2:03", 93780)])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0", "1:2:3:4", "-5"])
def test_parse_time_refuses(text):
    with pytest.raises(RanncError):
        parse_time(text)


def test_slurm_time_rounds_up_to_minutes():
    assert slurm_time(45) == "00:01:00" and slurm_time(7200) == "02:00:00" and slurm_time(93780) == "1-02:03:00"


def test_tsubame_dry_run_renders_its_grid_engine_dialect(tmp_path):
    """--site tsubame-4.0: resource type node_f per 4-GPU node, h_rt always (the site's default time),
    the group as qsub -g, the site's mpirun for the ranks; nothing submitted."""
    from conftest import ROOT, run_cli

    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--site", "tsubame-4.0", "--account", "tga-lab",
                  "--nodes", "2", "--gpus", "4", "--dry-run", cwd=tmp_path, env={"RANNC_LOGS_DIR": str(tmp_path / "logs")})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for needle in ("#$ -l node_f=2", "#$ -l node_q=1", "#$ -l h_rt=1:00:00", "#$ -l s_rt=0:58:00", "#$ -r y",
                   "mpirun -npernode 4 -n 8", "-g tga-lab -hold_jid", "dry run: nothing submitted"):
        assert needle in out, needle
    assert "#$ -pe" not in out and "-l gpu=" not in out
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("site,gpus,shape", [("tsubame-4.0", 8, "t4n: 240 node(s) x 4 GPUs"),
                                             ("abci-3.0", 16, "hnode: 766 node(s) x 8 GPUs")])
def test_gpus_above_the_sites_node_are_refused_with_its_shape(tmp_path, site, gpus, shape):
    from conftest import ROOT, run_cli

    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--site", site, "--nodes", "1", "--gpus", str(gpus),
                  "--dry-run", cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: --gpus {gpus} exceeds site {site}'s GPUs per node") and shape in lines[0]


SITES = {"abci-3.0": 8, "wisteria-aquarius": 8, "miyabi-g": 1, "pegasus": 1, "tsubame-4.0": 4}


@pytest.mark.parametrize("site", sorted(SITES))
def test_site_configs_render_their_own_dialect(site):
    """`rannc submit examples/mlp.py --site S --nodes 2 --gpus N`: each site's scripts in its batch system's
    dialect, with its queue, group option, MPI launcher and template overrides (golden files)."""
    root = Path(__file__).resolve().parent.parent
    s = resolve_spec(script=root / "examples" / "mlp.py", script_args=["--steps", "20"], nodes=2, gpus=SITES[site],
                     site=site, account="grp1", time="1:00:00", python="/home/alice/venv/bin/python",
                     workdir="/home/alice/src")
    scripts = render_scripts(s, "0123abcd", JOB_DIR, "cafe0123")
    for fname, text in scripts.items():
        text = text.replace(str(root), "<repo>")
        golden = GOLDEN / f"site-{site}-{fname}"
        if os.environ.get("RANNC_UPDATE_GOLDEN"):
            golden.write_text(text)
        assert golden.is_file(), f"missing golden file {golden}; run with RANNC_UPDATE_GOLDEN=1"
        assert text == golden.read_text(), f"{fname} of site {site} differs from {golden.name} (RANNC_UPDATE_GOLDEN=1)"
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    train = scripts["train.sh"]
    dialect = {"abci-3.0": ["#PBS -P grp1", "#PBS -l select=2:ncpus=8:ngpus=8:mpiprocs=8", "mpirun -npernode"],
               "miyabi-g": ["#PBS -W group_list=grp1", "#PBS -l select=2:mpiprocs=1\n", "#PBS -q regular-g"],
               "wisteria-aquarius": ["#PJM -L rscgrp=regular-a", "#PJM -L node=2", "#PJM --mpi proc=16",
                                     "#PJM -L elapse=01:00:00", "#PJM -g grp1", "-machinefile $PJM_O_NODEINF"],
               "tsubame-4.0": ["#$ -l node_f=2", "#$ -l h_rt=1:00:00", "#$ -l s_rt=0:58:00", "# rannc-qsub: -g grp1",
                               "mpirun -npernode 4 -n 8"],
               "pegasus": ["#PBS -A grp1", "#PBS -q gen_S", "#PBS -b 2", "#PBS -T openmpi", "#PBS -l gpunum_job=1",
                           "#PBS -l elapstim_req=01:00:00"]}[site]
    for needle in dialect:
        assert needle in train, f"{site}: {needle!r} missing"


def test_site_dry_run_through_the_cli(tmp_path):
    """The same through `rannc submit --dry-run` (the command a user types): the site's submit commands."""
    from conftest import run_cli

    root = Path(__file__).resolve().parent.parent
    want = {"wisteria-aquarius": "pjsub --step -o", "pegasus": "qsub -o", "miyabi-g": "qsub -N mlp-profile -q regular-g"}
    for site, needle in want.items():
        res = run_cli("submit", str(root / "examples" / "mlp.py"), "--site", site, "--nodes", "2", "--gpus",
                      str(SITES[site]), "--dry-run", cwd=tmp_path, env={"RANNC_LOGS_DIR": str(tmp_path / "logs")})
        assert res.returncode == 0, res.stderr
        assert needle in res.stdout and "dry run: nothing submitted" in res.stdout, res.stdout[-800:]
    assert not (tmp_path / "logs").exists()
