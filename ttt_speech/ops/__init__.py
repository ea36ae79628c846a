"""Pure TTT math: functions of tensors only, no parameters, no state, no autograd inside."""
