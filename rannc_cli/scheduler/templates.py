"""Render job scripts from templates/<backend>/*.j2 with quoting that cannot be forgotten.

    text = render("slurm", "train.sh.j2", {"spec": spec, "job_dir": "/home/me/logs/x"}, site_dir=None)

Templates are found in the site's own template folder first (``submit: templates:`` in a site
config, or the ``templates_dir`` setting), then in the project's ``templates/``: a site
overrides one file by putting one with the same name in its folder.

Rules enforced here, not by convention:
- ``StrictUndefined``: a missing value is an error, never an empty string.
- Every ``{{ expression }}`` must end in a filter that says how it is quoted: ``| q`` (one shell
  word through shlex.quote), ``| qjoin`` (a list of shell words), ``| directive`` (a plain token
  for a ``#SBATCH``/``#PBS`` line; anything else is refused), ``| directive_words`` (several such
  tokens separated by spaces, e.g. ``-pe smp 4``) or ``| trusted`` (site-config text,
  e.g. module names and setup lines, which the site's administrator wrote). Numbers may be
  printed bare. Rendering a bare string raises ``TemplateQuotingError``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Iterable

from rannc_cli.errors import RanncError
from rannc_cli.paths import project_root


class TemplateQuotingError(RanncError):
    """A template printed a string without saying how it is quoted."""


class _Safe(str):
    """A string that went through a quoting filter."""


def _q(value: Any) -> _Safe:
    if isinstance(value, (list, tuple)):
        raise TemplateQuotingError("the q filter quotes one word; use qjoin for a list")
    return _Safe(shlex.quote(str(value)))


def _qjoin(values: Iterable[Any]) -> _Safe:
    if isinstance(values, (str, bytes)):
        raise TemplateQuotingError("qjoin takes a list of words, not a string")
    return _Safe(" ".join(shlex.quote(str(v)) for v in values))


def _directive(value: Any) -> _Safe:
    from rannc_cli.scheduler.spec import check_directive_value

    return _Safe(check_directive_value("value", str(value)))


def _directive_words(value: Any) -> _Safe:
    """Several directive tokens (``-pe smp 4``, or a list of them), each checked like ``directive``."""
    words = value.split() if isinstance(value, str) else [str(v) for v in value]
    return _Safe(" ".join(_directive(w) for w in words))


def _trusted(value: Any) -> _Safe:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise TemplateQuotingError(f"site value {text!r} spans several lines")
    return _Safe(text)


def _finalize(value: Any) -> Any:
    if isinstance(value, _Safe) or value is None:
        return value if value is not None else ""
    if isinstance(value, bool):
        raise TemplateQuotingError("a template printed a boolean; use it in an {% if %} instead")
    if isinstance(value, (int, float)):
        return value
    raise TemplateQuotingError(f"a template printed {value!r} without a quoting filter (q, qjoin, directive, trusted)")


def template_dirs(backend: str, site_dir: str | None = None) -> list[Path]:
    from rannc_cli.config import settings

    dirs: list[Path] = []
    for extra in (site_dir, settings.get("templates_dir") or None):
        if extra:
            base = Path(extra).expanduser()
            dirs += [base / backend, base]
    dirs.append(project_root() / "templates" / backend)
    dirs.append(project_root() / "templates" / "_shared")   # partials several backends render alike
    return [d for d in dirs if d.is_dir()]


def render(backend: str, name: str, context: dict[str, Any], site_dir: str | None = None) -> str:
    """Render ``name`` for ``backend``; the text always ends with one newline."""
    import jinja2

    dirs = template_dirs(backend, site_dir)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(d) for d in dirs]), undefined=jinja2.StrictUndefined,
                             finalize=_finalize, autoescape=False, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(q=_q, qjoin=_qjoin, directive=_directive, directive_words=_directive_words, trusted=_trusted)
    try:
        text = env.get_template(name).render(**context)
    except jinja2.TemplateNotFound:
        raise RanncError(f"job script template {backend}/{name} not found",
                         hint=f"looked in {', '.join(map(str, dirs)) or 'no folder'}") from None
    except jinja2.UndefinedError as exc:
        raise RanncError(f"template {backend}/{name} uses an undefined value ({exc.message})",
                         hint="a site template may be out of date with this rannc version") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RanncError(f"template {exc.filename or name} line {exc.lineno}: {exc.message}") from None
    return text.rstrip("\n") + "\n"
