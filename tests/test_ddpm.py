"Tests of minisd.ddpm: the weighted DDPM loss."
import pytest, torch
from minisd.ddpm import ddpm_loss
from minisd.schedulers import DDPMScheduler


def test_ddpm_loss_weights_count_timesteps():
    "`weights` of ones is the simple loss; weights on one timestep only count that timestep; a wrong shape is named."
    sched, x0 = DDPMScheduler(num_train_timesteps=10), torch.rand(64, 1, 4, 4) * 2 - 1
    model = lambda x_t, t: x_t * (t[:, None, None, None] / 10)   # a loss that depends on t
    torch.manual_seed(0); plain = ddpm_loss(model, sched, x0)
    torch.manual_seed(0); ones = ddpm_loss(model, sched, x0, torch.ones(10))
    torch.testing.assert_close(plain, ones)
    only3 = torch.zeros(10); only3[3] = 1.
    torch.manual_seed(0); eps = torch.randn_like(x0); t = torch.randint(0, 10, (64,))
    x_t = sched.add_noise(x0, eps, t)
    per = (model(x_t, t) - eps).pow(2).flatten(1).mean(1)
    torch.manual_seed(0); torch.testing.assert_close(ddpm_loss(model, sched, x0, only3), (per * (t == 3)).mean())
    with pytest.raises(ValueError, match=r'one weight per timestep, shape \(10,\)'): ddpm_loss(model, sched, x0, torch.ones(5))
