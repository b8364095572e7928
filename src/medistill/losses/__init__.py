"""Loss functions (pure) and the per-step loss-term modules built on them."""

from medistill.losses.functional import (aggregate_teachers, at_loss, attention_map, balanced_class_weights,
                                         class_balanced_weights, dct2, dct_matrix, dct_remove_dc, dfm_loss,
                                         dho_combine, dkd_loss, dkd_parts,
                                         dual_student_losses, entropy_confidence, evidential_confidence,
                                         focal_loss, kd_loss, kd_per_sample, logit_adjusted_ce, mmd2,
                                         multiscale_lowpass, nd_loss, peer_kl, region_logits, idct2,
                                         soft_target_ce, udd_loss)

__all__ = ["aggregate_teachers", "at_loss", "attention_map", "balanced_class_weights", "class_balanced_weights",
           "dct2", "dct_matrix", "dct_remove_dc", "dfm_loss", "dho_combine", "idct2", "soft_target_ce", "dkd_loss", "dkd_parts", "dual_student_losses", "entropy_confidence",
           "evidential_confidence", "focal_loss", "kd_loss", "kd_per_sample", "logit_adjusted_ce", "mmd2",
           "multiscale_lowpass", "nd_loss", "peer_kl", "region_logits", "udd_loss"]
