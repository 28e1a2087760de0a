"""What the CLI tests share: invoke the command in-process, and check the one-line error contract."""

from click.testing import CliRunner

from toolkit.cli import cli


def run(*args):
    """`toolkit ARGS...` in-process (arguments converted to strings)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, pattern):
    """Exit status 2 and exactly one line `error: ...` on stderr that contains ``pattern``."""
    assert result.exit_code == 2, (result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


class V1DDIM:
    """A plugin-API-1 sampler (DDIM, η = 0), written against the old protocol: timesteps, a step on the
    model output, and the standard loop as its sample()."""

    name, stochastic, clip = "v1-ddim", False, False

    def timesteps(self, schedule, steps):
        from toolkit.sampling import spaced_timesteps

        return spaced_timesteps(schedule.num_timesteps, steps)

    def step(self, out, x_t, t, t_prev, schedule, noise):
        from toolkit.diffusion import alpha_bar

        a, ap = alpha_bar(schedule, t, x_t), alpha_bar(schedule, t_prev, x_t)
        x0 = (x_t - (1 - a).sqrt() * out[:, : x_t.shape[1]]) / a.sqrt()
        if self.clip:
            x0 = x0.clamp(-1, 1)
        return ap.sqrt() * x0 + (1 - ap).sqrt() * (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def sample(self, model_fn, schedule, x_T, *, steps, noise_fn, progress=None):
        from toolkit.sampling import sample_loop

        return sample_loop(self, model_fn, schedule, x_T, steps=steps, noise_fn=noise_fn)


class HalvedV1(V1DDIM):
    """Plugin API 1 whose sample() is not the standard loop: torch runs it, the exporter must refuse it."""

    name = "halved"

    def sample(self, model_fn, schedule, x_T, *, steps, noise_fn, progress=None):
        return 0.5 * super().sample(model_fn, schedule, x_T, steps=steps, noise_fn=noise_fn)
