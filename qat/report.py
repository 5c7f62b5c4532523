"""What people look at: Markdown tables, PNG plots (written atomically), progress bars."""
import math
import os

import numpy as np

from .fileio import atomic_path, atomic_write


def format_table(rows, headers):
    """A Markdown table from rows of values."""
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def fmt_number(value, digits):
    """``value`` with ``digits`` decimals; '' for None, 'inf' / '-inf' for infinities."""
    if value is None:
        return ''
    if isinstance(value, float) and math.isinf(value):
        return 'inf' if value > 0 else '-inf'
    return f"{value:.{digits}f}"


def progress(iterable=None, label='', total=None, enabled=True, **kwargs):
    """A tqdm progress bar on stderr (silent when disabled or when stderr is not a
    terminal)."""
    from tqdm import tqdm
    return tqdm(iterable, desc=label, total=total, leave=False, dynamic_ncols=True,
                disable=not enabled or None, **kwargs)



def label_axis(axis, xlabel, ylabel, legend=True):
    """Axis labels, a light grid and (with ``legend``) a small legend."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if legend:
        axis.legend(fontsize=8)


def save_figure(fig, path):
    """Lay out a matplotlib figure, write it as PNG at ``path`` atomically and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _finite(values, fallback):
    # (NaN stays NaN: matplotlib draws no bar for a value that does not exist)
    return [v if math.isfinite(v) or math.isnan(v) else fallback for v in values]


def bar_panels(names, panels, title, path):
    """One bar chart per panel, stacked, sharing the x axis ``names``; a panel is (label,
    values) or (label, {legend: values}) for grouped bars. Infinite values are drawn at the
    panel's largest finite value, NaN as no bar. PNG at ``path``, atomic."""
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.35 * len(names) + 2),
                                                      2.6 * len(panels)), sharex=True,
                             squeeze=False)
    positions = np.arange(len(names))
    for axis, (label, values) in zip(axes[:, 0], panels):
        groups = values if isinstance(values, dict) else {None: values}
        width = 0.8 / len(groups)
        for offset, (legend, series_values) in enumerate(groups.items()):
            ceiling = max((v for v in series_values if math.isfinite(v)), default=0.0)
            axis.bar(positions + (offset - (len(groups) - 1) / 2) * width,
                     _finite(series_values, ceiling), width, label=legend)
        if len(groups) > 1:
            axis.legend(fontsize=7)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(axis='y', alpha=0.3)
    axes[-1, 0].set_xticks(positions)
    axes[-1, 0].set_xticklabels(names, rotation=90, fontsize=7)
    axes[0, 0].set_title(title)
    return save_figure(fig, path)


def hbars(names, values, title, xlabel, path):
    """One horizontal bar per name, top to bottom (for long labels); PNG at ``path``,
    atomic."""
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(8, 0.25 * len(names) + 1.2))
    positions = np.arange(len(names))
    axis.barh(positions, values)
    axis.set_yticks(positions)
    axis.set_yticklabels(names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel(xlabel)
    axis.grid(axis='x', alpha=0.3)
    axis.set_title(title)
    return save_figure(fig, path)


def write_report(text, plot, folder, name):
    """Write ``<name>.md`` (``text``) and ``<name>.png`` (``plot(path)``) into ``folder``,
    each atomically. Returns {'table': path, 'plot': path}."""
    os.makedirs(folder, exist_ok=True)
    table_path = os.path.join(folder, f"{name}.md")
    atomic_write(table_path, text + '\n')
    plot_path = plot(os.path.join(folder, f"{name}.png"))
    return {'table': table_path, 'plot': plot_path}
