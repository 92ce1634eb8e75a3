"""Authentication of received mail (work in progress on this branch): DNS answers for it
(:mod:`.resolver`) and SPF (:mod:`.spf`)."""
