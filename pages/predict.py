"""Predict: upload dermoscopic photos, get P(malignant), the decision at the shared threshold, its Grad-CAM,
whether the decision survives covering the corners, and (on request) whether it survives another camera."""
import pandas as pd
import streamlit as st

from core import metrics
from core.audit.explain import CAM_METHODS
from core.audit.interventions import CORNER_CHECK, DEFAULT_MIN_DELTA
from core.data import DataError
from core.overlay import cam_overlay
from core.predictor import Prediction
from core.runs import RunError
from core.transforms import CROP_DESCRIPTIONS
from dashboard import acquisition_panel, gallery, loaders, site_panels, state

UPLOAD_TYPES = ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"]
RESULTS_KEY = "predict_results"  # this session's predictions, by upload: uploads never leave the session

st.title("Predict")
st.warning("Research tool, not a medical device. It has not been validated for clinical use: never base a "
           "diagnosis or a treatment decision on it.", icon=":material/warning:")
run = state.current_run()
predictor = loaders.or_stop(lambda: loaders.predictor(run), f"Cannot load the model of `{run}`.",
                            (RunError, DataError, RuntimeError, ValueError))

threshold = state.threshold()
options = st.columns([2, 1, 1])
uploads = options[0].file_uploader("Dermoscopic photo(s): JPEG, PNG, BMP, TIFF or WebP, up to 25 MB each",
                                   type=UPLOAD_TYPES, accept_multiple_files=True, key="uploads")
method = options[1].selectbox("CAM method", list(CAM_METHODS), key="cam_method")
with options[2]:
    opacity = gallery.opacity_slider()

site = state.site()
if state.at_site_threshold(site):
    st.caption("At the operating point of " + site_panels.profile_caption(site) + ". Change it in the sidebar.")
else:
    if site is not None:
        st.caption(f"The threshold has moved from site {site.name}'s ({site.point.threshold:.3f}), so its expected "
                   "rates no longer apply; what the test split gives instead:")
    try:
        test = loaders.cases(run, "test")
        at = metrics.binary_metrics(test["label"], test["probability"], threshold)
        st.caption(f"At threshold **{threshold:.3f}** the model has sensitivity **{at['sensitivity']:.1%}** and "
                   f"specificity **{at['specificity']:.1%}** on the {len(test):,} test images of HAM10000. On other "
                   "clinics' images this threshold may not hold: pick a site operating point in the sidebar "
                   "(`train.py site`).")
    except RunError:
        st.caption(f"Threshold {threshold:.3f}. This run has no test predictions, so its sensitivity and "
                   "specificity at this threshold are unknown.")


def predict(upload) -> Prediction | str:
    """This session's cached prediction for one upload (per CAM method and explained class), or the error text."""
    results = st.session_state.setdefault(RESULTS_KEY, {})
    key = (upload.file_id, method, threshold)
    if key not in results:
        try:
            results[key] = predictor.predict(upload.getvalue(), explain=True, method=method, threshold=threshold,
                                             corner_check=True)
        except DataError as err:
            results[key] = str(err).replace("uploaded bytes", upload.name)
    return results[key]


# Keep only what this run shows: removed uploads, other CAM methods and other thresholds are dropped, so a session
# that moves the threshold many times does not pile up CAMs.
current = {(upload.file_id, method, threshold) for upload in uploads or []}
st.session_state[RESULTS_KEY] = {k: v for k, v in st.session_state.get(RESULTS_KEY, {}).items() if k in current}
shown = {(str(run), upload.file_id) for upload in uploads or []}
st.session_state[acquisition_panel.CAMERA_KEY] = {
    k: v for k, v in st.session_state.get(acquisition_panel.CAMERA_KEY, {}).items() if k in shown}
if not uploads:
    st.info("Upload one or more photos of a skin lesion (dermoscopy, lesion centred) to see a prediction.")
for upload in uploads or []:
    st.divider()
    result = predict(upload)
    if isinstance(result, str):
        st.error(f"**{upload.name}** cannot be used: {result}")
        continue
    malignant = result.is_malignant(threshold)
    at_site = state.at_site_threshold(site)
    decision = result.decision(threshold, site=at_site)
    withheld = decision == "withheld"
    st.subheader(upload.name)
    if withheld:
        st.error(gallery.ood_warning(result, predictor.ood), icon=":material/block:")
    elif result.out_of_distribution:  # only its style is unlike ours, and site's threshold was chosen on such images
        st.info(f"Its colour, texture or sharpness is unlike the training images (another camera?); decided at site "
                f"{site.name}'s threshold, which was chosen on that site's own images.")
    image_col, cam_col, numbers = st.columns([1, 1, 1.2])
    image_col.image(result.model_input, caption=f"as the model sees it ({CROP_DESCRIPTIONS[predictor.config.crop]})",
                    width="stretch")
    cam_col.image(cam_overlay(result.model_input, result.cam, opacity), width="stretch",
                  caption=f"{method} of the '{'malignant' if malignant else 'benign'}' decision"
                  + (" (withheld)" if withheld else ""))
    if withheld:  # the number stays visible, greyed, and is not turned into a decision
        numbers.markdown(f"P(malignant) :gray[{result.probability:.3f} — unreliable]")
        numbers.markdown(f"Decision at {threshold:.3f}: **withheld** (image unlike the training data)")
    else:
        numbers.metric("P(malignant)", f"{result.probability:.3f}")
        verdict = "**malignant** (≥ threshold)" if malignant else "**benign** (< threshold)"
        numbers.markdown(f"Decision at {threshold:.3f}: {verdict}")
    if result.ood_score is None:
        numbers.caption(f"This run has no embedding index, so nothing checks whether the image is like the "
                        f"training data: `python train.py index --run {run}` builds it.")
    elif not result.out_of_distribution:
        numbers.caption(f"Like the training data: distance {result.ood_score:.3f} to the training images "
                        f"(flagged above {predictor.ood.threshold:.3f}).")
    covered, vignette = (result.corner_probabilities[name] for name in CORNER_CHECK)
    checks = numbers.columns(2)
    checks[0].metric("corners covered", f"{covered:.3f}", f"{covered - result.probability:+.3f}", delta_color="off",
                     help="P(malignant) with everything outside the inscribed circle painted in the image's own "
                          "skin colour.")
    checks[1].metric("vignette added", f"{vignette:.3f}", f"{vignette - result.probability:+.3f}", delta_color="off",
                     help="P(malignant) with a dark dermoscope ring painted into the corners.")
    if result.corner_dependent:
        numbers.warning(gallery.corner_dependence_note(result.probability, covered, vignette),
                        icon=":material/crop_free:")
    else:
        numbers.caption("The corner check leaves this decision as it is: covering the corners or adding a vignette "
                        f"neither flips it nor moves p by {DEFAULT_MIN_DELTA} or more.")
    with numbers.expander("The images of the corner check"):
        views = st.columns(len(CORNER_CHECK))
        for column, name in zip(views, CORNER_CHECK):
            column.image(result.corner_views[name], caption=f"{name}: p = {result.corner_probabilities[name]:.3f}",
                         width="stretch")
    if result.similar is not None:
        st.markdown("**Most similar training cases** (by the model's own features; distance in its embedding)")
        gallery.similar_cases(result.similar, loaders.data_dir_or_none()[0], upload.file_id)
    if not withheld:
        acquisition_panel.camera_check(predictor, upload, result.probability, threshold, run)
    numbers.dataframe(pd.Series({"CAM share in the corners": f"{result.attention['corner_fraction']:.1%}",
                                 "CAM share in the border": f"{result.attention['border_fraction']:.1%}",
                                 "dark-corner score": f"{result.attention['dark_corner_score']:.3f}"},
                                name="Grad-CAM attention (explanatory)"), width="stretch")
