"""Wire types, subjects, codecs and the engine's ports of shoal.

``protocol`` knows nothing of SQLite or of segment rules, and imports no ``nats``: the NATS
implementation is the subpackage ``protocol.nats``, the in-memory one ``protocol.memory``.
"""

from ._api import MAX_PAGE as MAX_PAGE
from ._api import MAX_PREFIX_CHARS as MAX_PREFIX_CHARS
from ._api import MAX_SEARCH as MAX_SEARCH
from ._api import CustomerReply as CustomerReply
from ._api import CustomerRequest as CustomerRequest
from ._api import DefinitionsApplied as DefinitionsApplied
from ._api import DefinitionsReply as DefinitionsReply
from ._api import DefinitionsRequest as DefinitionsRequest
from ._api import EventCounter as EventCounter
from ._api import ExplainReply as ExplainReply
from ._api import ExplainRequest as ExplainRequest
from ._api import GatheredStatus as GatheredStatus
from ._api import Membership as Membership
from ._api import MembersReply as MembersReply
from ._api import MembersRequest as MembersRequest
from ._api import Ownership as Ownership
from ._api import ParkedInfo as ParkedInfo
from ._api import PartitionLease as PartitionLease
from ._api import SearchReply as SearchReply
from ._api import SearchRequest as SearchRequest
from ._api import SegmentInfo as SegmentInfo
from ._api import SegmentSize as SegmentSize
from ._api import SegmentsReply as SegmentsReply
from ._api import SegmentsRequest as SegmentsRequest
from ._api import StatusReply as StatusReply
from ._api import StatusRequest as StatusRequest
from ._api import UnparkReply as UnparkReply
from ._api import UnparkRequest as UnparkRequest
from ._broker import embedded_broker as embedded_broker
from ._broker import find_nats_server as find_nats_server
from ._broker import port_in_use as port_in_use
from ._cluster import ClusterNode as ClusterNode
from ._cluster import embedded_cluster as embedded_cluster
from ._cluster import is_loopback as is_loopback
from ._cluster import jetstream_health as jetstream_health
from ._cluster import meta_leader as meta_leader
from ._cluster import wait_cluster_ready as wait_cluster_ready
from ._cluster import write_cluster_config as write_cluster_config
from ._definitions import DEFINITIONS_BUCKET as DEFINITIONS_BUCKET
from ._definitions import MAX_STORED_DEFINITIONS_BYTES as MAX_STORED_DEFINITIONS_BYTES
from ._definitions import ApiOrigin as ApiOrigin
from ._definitions import DefinitionsBoard as DefinitionsBoard
from ._definitions import DefinitionsMarker as DefinitionsMarker
from ._definitions import FileOrigin as FileOrigin
from ._definitions import Origin as Origin
from ._definitions import StoredDefinitions as StoredDefinitions
from ._definitions import StoredDefinitionsError as StoredDefinitionsError
from ._definitions import decode_definitions as decode_definitions
from ._definitions import decode_marker as decode_marker
from ._definitions import encode_definitions as encode_definitions
from ._definitions import encode_marker as encode_marker
from ._errors import ApiError as ApiError
from ._errors import BrokerError as BrokerError
from ._errors import CustomerParked as CustomerParked
from ._errors import DefinitionsSuperseded as DefinitionsSuperseded
from ._errors import EngineIdInUse as EngineIdInUse
from ._errors import EnginesDisagree as EnginesDisagree
from ._errors import EngineUnavailable as EngineUnavailable
from ._errors import Fenced as Fenced
from ._errors import InvalidRequest as InvalidRequest
from ._errors import LeaseLost as LeaseLost
from ._errors import PermissionDenied as PermissionDenied
from ._errors import ProtocolError as ProtocolError
from ._errors import SubjectError as SubjectError
from ._errors import Unconfirmed as Unconfirmed
from ._errors import UnknownCustomer as UnknownCustomer
from ._errors import UnknownSegment as UnknownSegment
from ._errors import UnreadableRecord as UnreadableRecord
from ._explain import ConditionExplanation as ConditionExplanation
from ._explain import SegmentExplanation as SegmentExplanation
from ._forget import MAX_FORGET as MAX_FORGET
from ._forget import ForgetOrder as ForgetOrder
from ._forget import ForgetReply as ForgetReply
from ._forget import ForgetRequest as ForgetRequest
from ._forget import ForgottenCustomer as ForgottenCustomer
from ._forget import decode_forget_order as decode_forget_order
from ._forget import forget_hash as forget_hash
from ._gather import partition_ranges as partition_ranges
from ._inbound import DEFAULT_MAX_EVENT_BYTES as DEFAULT_MAX_EVENT_BYTES
from ._inbound import MAX_FUTURE_SKEW as MAX_FUTURE_SKEW
from ._inbound import InvalidEvent as InvalidEvent
from ._inbound import decode_event as decode_event
from ._inbound import parse_timestamp as parse_timestamp
from ._keys import KEYS_DIR as KEYS_DIR
from ._keys import KeyFileError as KeyFileError
from ._keys import role_key_file as role_key_file
from ._limits import EARLIEST as EARLIEST
from ._lines import OrderedHistory as OrderedHistory
from ._lines import event_from_line as event_from_line
from ._lines import event_line as event_line
from ._lines import events_from_lines as events_from_lines
from ._lines import read_history as read_history
from ._ownership import EngineInfo as EngineInfo
from ._ownership import FenceClaim as FenceClaim
from ._ownership import PartitionSnapshot as PartitionSnapshot
from ._partitions import DEFAULT_PARTITIONS as DEFAULT_PARTITIONS
from ._partitions import partition as partition
from ._partitions import partition_consumer as partition_consumer
from ._ports import Delivery as Delivery
from ._ports import EventSource as EventSource
from ._ports import FencedOut as FencedOut
from ._ports import PublishError as PublishError
from ._ports import StreamState as StreamState
from ._ports import TransitionSink as TransitionSink
from ._query import API_VERSION as API_VERSION
from ._query import QueryHandler as QueryHandler
from ._roles import ROLES as ROLES
from ._roles import inbox_prefix as inbox_prefix
from ._roles import nkey_users_config as nkey_users_config
from ._roles import permissions_block as permissions_block
from ._roles import role_summary as role_summary
from ._spill import SpillError as SpillError
from ._subjects import API_ENDPOINTS as API_ENDPOINTS
from ._subjects import API_PREFIX as API_PREFIX
from ._subjects import API_SERVICE as API_SERVICE
from ._subjects import CONTROL_WILDCARD as CONTROL_WILDCARD
from ._subjects import DEFINITIONS_MARKERS as DEFINITIONS_MARKERS
from ._subjects import EVENTS_STREAM as EVENTS_STREAM
from ._subjects import EVENTS_WILDCARD as EVENTS_WILDCARD
from ._subjects import GATHERED_ENDPOINTS as GATHERED_ENDPOINTS
from ._subjects import IMPORT_HEADER as IMPORT_HEADER
from ._subjects import IMPORT_MARKERS as IMPORT_MARKERS
from ._subjects import LEASES_BUCKET as LEASES_BUCKET
from ._subjects import LEASES_STREAM as LEASES_STREAM
from ._subjects import PARTITION_HEADER as PARTITION_HEADER
from ._subjects import RECEIVED_HEADER as RECEIVED_HEADER
from ._subjects import REJECTED_STREAM as REJECTED_STREAM
from ._subjects import REJECTED_SUBJECT as REJECTED_SUBJECT
from ._subjects import SEGMENTS_STREAM as SEGMENTS_STREAM
from ._subjects import SEGMENTS_WILDCARD as SEGMENTS_WILDCARD
from ._subjects import SNAPSHOTS_BUCKET as SNAPSHOTS_BUCKET
from ._subjects import api_subject as api_subject
from ._subjects import customer_api_subject as customer_api_subject
from ._subjects import customer_of_api_subject as customer_of_api_subject
from ._subjects import customer_of_event_subject as customer_of_event_subject
from ._subjects import customer_of_stored_subject as customer_of_stored_subject
from ._subjects import definitions_marker_subject as definitions_marker_subject
from ._subjects import escape_token as escape_token
from ._subjects import event_subject as event_subject
from ._subjects import fence_probe_subject as fence_probe_subject
from ._subjects import forget_order_subject as forget_order_subject
from ._subjects import import_marker_of as import_marker_of
from ._subjects import import_marker_subject as import_marker_subject
from ._subjects import is_control_subject as is_control_subject
from ._subjects import is_definitions_marker as is_definitions_marker
from ._subjects import is_fence_probe as is_fence_probe
from ._subjects import is_forget_order as is_forget_order
from ._subjects import segment_filter as segment_filter
from ._subjects import segment_subject as segment_subject
from ._subjects import stored_event_subject as stored_event_subject
from ._subjects import unescape_token as unescape_token
from ._subjects import validate_engine_id as validate_engine_id
from ._subjects import validate_import_id as validate_import_id
from ._subjects import validate_segment_name as validate_segment_name
from ._time import DAY as DAY
from ._time import HOUR as HOUR
from ._time import MINUTE as MINUTE
from ._time import NEVER as NEVER
from ._time import SECOND as SECOND
from ._time import format_instant as format_instant
from ._time import from_instant as from_instant
from ._time import to_instant as to_instant
from ._types import Cause as Cause
from ._types import DefinitionCause as DefinitionCause
from ._types import Event as Event
from ._types import EventCause as EventCause
from ._types import ForgottenCause as ForgottenCause
from ._types import ImportCause as ImportCause
from ._types import Rejection as Rejection
from ._types import TimeCause as TimeCause
from ._types import Transition as Transition
from ._types import header_token as header_token

__all__ = (
    "API_ENDPOINTS",
    "API_PREFIX",
    "API_SERVICE",
    "API_VERSION",
    "ApiError",
    "ApiOrigin",
    "BrokerError",
    "CONTROL_WILDCARD",
    "Cause",
    "ClusterNode",
    "ConditionExplanation",
    "CustomerParked",
    "CustomerReply",
    "CustomerRequest",
    "DAY",
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_PARTITIONS",
    "DEFINITIONS_BUCKET",
    "DEFINITIONS_MARKERS",
    "DefinitionCause",
    "DefinitionsApplied",
    "DefinitionsBoard",
    "DefinitionsMarker",
    "DefinitionsReply",
    "DefinitionsRequest",
    "DefinitionsSuperseded",
    "Delivery",
    "EARLIEST",
    "EVENTS_STREAM",
    "EVENTS_WILDCARD",
    "EngineIdInUse",
    "EngineInfo",
    "EngineUnavailable",
    "EnginesDisagree",
    "Event",
    "EventCause",
    "EventCounter",
    "EventSource",
    "ExplainReply",
    "ExplainRequest",
    "FenceClaim",
    "Fenced",
    "FencedOut",
    "FileOrigin",
    "ForgetOrder",
    "ForgetReply",
    "ForgetRequest",
    "ForgottenCause",
    "ForgottenCustomer",
    "GATHERED_ENDPOINTS",
    "GatheredStatus",
    "HOUR",
    "IMPORT_HEADER",
    "IMPORT_MARKERS",
    "ImportCause",
    "InvalidEvent",
    "InvalidRequest",
    "KEYS_DIR",
    "KeyFileError",
    "LEASES_BUCKET",
    "LEASES_STREAM",
    "LeaseLost",
    "MAX_FORGET",
    "MAX_FUTURE_SKEW",
    "MAX_PAGE",
    "MAX_PREFIX_CHARS",
    "MAX_SEARCH",
    "MAX_STORED_DEFINITIONS_BYTES",
    "MINUTE",
    "MembersReply",
    "MembersRequest",
    "Membership",
    "NEVER",
    "OrderedHistory",
    "Origin",
    "Ownership",
    "PARTITION_HEADER",
    "ParkedInfo",
    "PartitionLease",
    "PartitionSnapshot",
    "PermissionDenied",
    "ProtocolError",
    "PublishError",
    "QueryHandler",
    "RECEIVED_HEADER",
    "REJECTED_STREAM",
    "REJECTED_SUBJECT",
    "ROLES",
    "Rejection",
    "SECOND",
    "SEGMENTS_STREAM",
    "SEGMENTS_WILDCARD",
    "SNAPSHOTS_BUCKET",
    "SearchReply",
    "SearchRequest",
    "SegmentExplanation",
    "SegmentInfo",
    "SegmentSize",
    "SegmentsReply",
    "SegmentsRequest",
    "SpillError",
    "StatusReply",
    "StatusRequest",
    "StoredDefinitions",
    "StoredDefinitionsError",
    "StreamState",
    "SubjectError",
    "TimeCause",
    "Transition",
    "TransitionSink",
    "Unconfirmed",
    "UnknownCustomer",
    "UnknownSegment",
    "UnparkReply",
    "UnparkRequest",
    "UnreadableRecord",
    "api_subject",
    "customer_api_subject",
    "customer_of_api_subject",
    "customer_of_event_subject",
    "customer_of_stored_subject",
    "decode_definitions",
    "decode_event",
    "decode_forget_order",
    "decode_marker",
    "definitions_marker_subject",
    "embedded_broker",
    "embedded_cluster",
    "encode_definitions",
    "encode_marker",
    "escape_token",
    "event_from_line",
    "event_line",
    "event_subject",
    "events_from_lines",
    "fence_probe_subject",
    "find_nats_server",
    "forget_hash",
    "forget_order_subject",
    "format_instant",
    "from_instant",
    "header_token",
    "import_marker_of",
    "import_marker_subject",
    "inbox_prefix",
    "is_control_subject",
    "is_definitions_marker",
    "is_fence_probe",
    "is_forget_order",
    "is_loopback",
    "jetstream_health",
    "meta_leader",
    "nkey_users_config",
    "parse_timestamp",
    "partition",
    "partition_consumer",
    "partition_ranges",
    "permissions_block",
    "port_in_use",
    "read_history",
    "role_key_file",
    "role_summary",
    "segment_filter",
    "segment_subject",
    "stored_event_subject",
    "to_instant",
    "unescape_token",
    "validate_engine_id",
    "validate_import_id",
    "validate_segment_name",
    "wait_cluster_ready",
    "write_cluster_config",
)
