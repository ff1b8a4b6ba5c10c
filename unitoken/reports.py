"""HTML reports (validation, evaluation) rendered from the Jinja2 templates in
``unitoken/templates/``: every report extends ``base.html.j2``, and every value is escaped
(autoescape), so a manifest row or a model's answer cannot inject markup."""

from __future__ import annotations

import functools

import jinja2


@functools.cache
def _environment() -> jinja2.Environment:
    # StrictUndefined: a renamed report key fails the render instead of printing an empty cell
    return jinja2.Environment(loader=jinja2.PackageLoader("unitoken", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context) -> str:
    """The HTML of ``templates/<template>`` with ``context``."""
    return _environment().get_template(template).render(**context)
