"""Errors that carry a reason a user can act on."""


class BadInputError(ValueError):
    """A file or record cannot be used. `reason` is a short machine-groupable code, the message says why."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# Quarantine reason codes: ingest writes one of these per rejected file; the synthetic generator's
# answer key uses the same codes for the corrupt files it plants.
ECG_TRUNCATED = "ecg_truncated"  # signal file shorter than the header says
ECG_MISSING_SIGNAL_FILE = "ecg_missing_signal_file"  # header names a file that is not there
ECG_BAD_HEADER = "ecg_bad_header"  # header cannot be parsed
ECG_MISSING_LEADS = "ecg_missing_leads"  # one of the 12 standard leads is absent
ECG_FLAT_LEAD = "ecg_flat_lead"  # a lead is constant
ECG_NAN = "ecg_nan"  # mostly NaN / non-finite
ECG_DUPLICATE = "ecg_duplicate"  # same signal content as an earlier record
ECG_NOT_INDEXED = "ecg_not_indexed"  # record has no row in ecg_index.csv
ECG_UNPAIRED = "ecg_unpaired"  # no angiogram of the patient within the pairing window
STUDY_UNPAIRED = "study_unpaired"  # view of a study with no ECG of the patient within the pairing window
DICOM_UNREADABLE = "dicom_unreadable"  # not a DICOM file or broken
DICOM_NOT_XA = "dicom_not_xa"  # another modality
DICOM_NO_PIXELS = "dicom_no_pixels"  # no pixel data
DICOM_NO_DECODER = "dicom_no_decoder"  # transfer syntax without an installed decoder
DICOM_DUPLICATE = "dicom_duplicate"  # same SOPInstanceUID as an earlier file
DICOM_NO_PATIENT = "dicom_no_patient"  # no PatientID: the view cannot be paired with ECGs
STUDY_NO_ANNOTATIONS = "study_no_annotations"  # angiography study without stenosis rows
ANNOTATION_UNKNOWN_STUDY = "annotation_unknown_study"  # stenosis rows for a study with no usable view
ANNOTATION_INVALID = "annotation_invalid"  # segment outside 1-16 or degree outside 0-100
FILE_OVER_LIMIT = "file_over_limit"  # header asks for more than the configured limits (stence/data/limits.py)
ECG_UNSUPPORTED_FORMAT = "ecg_unsupported_format"  # an ECG export format not read yet (vendor XML, DICOM ECG)
ECG_BAD_XML = "ecg_bad_xml"  # vendor ECG XML malformed, truncated, or not decodable in its declared encoding
ECG_XML_FORBIDDEN = "ecg_xml_forbidden"  # XML with entity declarations or external references (refused unread)
ECG_BAD_WAVEFORM = "ecg_bad_waveform"  # vendor waveform missing, corrupt (base64, CRC, compression) or unscalable
UNRECOGNISED_FILE = "unrecognised_file"  # a file under the export that is no known input
ECG_INDEX_MISSING_FILE = "ecg_index_missing_file"  # ecg_index.csv row naming a record that does not exist
ECG_INDEX_MISMATCH = "ecg_index_mismatch"  # a vendor ECG file names another patient or date than its ecg_index.csv row
ECG_INDEX_INVALID = "ecg_index_invalid"  # ecg_index.csv row with an empty or unusable field (e.g. ambiguous date)
DICOM_BURNED_IN = "dicom_burned_in"  # BurnedInAnnotation YES: pixels may show identifiers (no masking yet)
DICOM_BAD_FRAME_COUNT = "dicom_bad_frame_count"  # NumberOfFrames 0 or not matching the pixel data
ANNOTATION_NO_STUDY = "annotation_no_study_uid"  # annotation row without a study UID
SYMLINK_OUTSIDE_EXPORT = "symlink_outside_export"  # a link pointing outside the export folder (not followed)
DECODE_WORKER_DIED = "decode_worker_died"  # the process decoding the file died (killed, out of memory)
