"""What `copy.deepcopy` and `pickle` keep of an Amos: torch keeps defaults, state and param
groups; Amos adds its settings and counters. Its caches (the step plan, checked states, the
verdict's vectors) are keyed by the old tensors and rebuilt by the copy."""
import pickle

# kept: the settings a param group cannot override, and the counters and once-only warnings
KEPT = ("backend", "guard", "capturable", "eta_fn", "total_steps", "_skipped", "_skipped_on", "_guarded_on",
        "_notices")


class EtaFn:
    """Carries `eta_fn` through a copy: deepcopy keeps it as it is (functions are not copied);
    pickle keeps it when it can be pickled, else a `DroppedEtaFn` (a lambda or a local function
    cannot be pickled, and eta_fn is needed only to add a param group)."""

    def __init__(self, fn):
        self.fn = fn

    def __deepcopy__(self, memo):
        return EtaFn(self.fn)

    def __reduce__(self):
        try:
            pickle.dumps(self.fn)
            fn = self.fn
        except Exception:  # what pickle raises for an object it cannot pickle varies
            fn = DroppedEtaFn(repr(self.fn))
        return EtaFn, (fn,)


class DroppedEtaFn:
    """Stands in for an eta_fn that could not be pickled: raises, saying so, if it is ever used."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return f"<eta_fn {self.text}, not picklable: dropped>"

    def __call__(self, name, param):
        raise RuntimeError(f"Amos: eta_fn {self.text} could not be pickled with this optimizer, so this copy "
                           "cannot measure eta for a new param group; set optimizer.eta_fn again, or give the "
                           "group an 'eta'")
