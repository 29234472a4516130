"""The functions user SQL may call in the Query Service: an allowlist, by what an analyst needs.

``trace_core.query_gate`` admits a function call (scalar, aggregate, window, operator) only when
its name is listed here; anything else is refused naming the function. The names were taken from
the pinned DuckDB's ``duckdb_functions()`` (1.4.4) and kept when they compute on their arguments
alone. Left out on purpose: functions that read settings, variables, the environment, the
catalog or the process (``current_setting``, ``getvariable``, ``current_database``,
``version``, ``stats``, ``pg_*``, ``has_*_privilege``, ``duckdb_*``), run or reveal SQL
(``json_serialize_sql``, ``json_execute_serialized_sql``, ``query``), change state
(``setseed``, ``nextval``, ``write_log``), read files or URLs (``read_*``, ``glob``), and
internal or niche helpers (``__internal_*``, aggregate-state ``combine``/``finalize``, ICU
collation functions, path parsing). A function DuckDB adds in a later version is refused until
it is listed. Pure data: standard library only.
"""

from __future__ import annotations

__all__ = ["ALLOWED_FUNCTIONS", "FUNCTION_GROUPS"]


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Allowed function names by group (lower case, as DuckDB's parse tree writes them).
FUNCTION_GROUPS: dict[str, frozenset[str]] = {
    "aggregates": _names(
        """
        any_value approx_count_distinct approx_quantile approx_top_k arbitrary arg_max
        arg_max_null arg_min arg_min_null argmax argmin array_agg avg bit_and bit_or bit_xor
        bitstring_agg bool_and bool_or corr count count_if count_star countif covar_pop
        covar_samp entropy favg first fsum group_concat histogram histogram_exact kahan_sum
        kurtosis kurtosis_pop last list listagg mad max max_by mean median min min_by mode
        product quantile quantile_cont quantile_disc regr_avgx regr_avgy regr_count
        regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy reservoir_quantile sem
        skewness stddev stddev_pop stddev_samp string_agg sum sum_no_overflow sumkahan var_pop
        var_samp variance
        """
    ),
    "lists, arrays, maps and structs": _names(
        """
        aggregate apply array_aggr array_aggregate array_append array_apply array_cat
        array_concat array_contains array_cosine_distance array_cosine_similarity
        array_cross_product array_distance array_distinct array_dot_product array_extract
        array_filter array_grade_up array_has array_has_all array_has_any array_indexof
        array_inner_product array_intersect array_length array_negative_dot_product
        array_negative_inner_product array_pop_back array_pop_front array_position array_prepend
        array_push_back array_push_front array_reduce array_resize array_reverse
        array_reverse_sort array_select array_slice array_sort array_to_json array_to_string
        array_to_string_comma_default array_transform array_unique array_value array_where
        array_zip cardinality element_at filter flatten generate_series generate_subscripts
        grade_up len list_aggr list_aggregate list_any_value list_append list_apply
        list_approx_count_distinct list_avg list_bit_and list_bit_or list_bit_xor list_bool_and
        list_bool_or list_cat list_concat list_contains list_cosine_distance
        list_cosine_similarity list_count list_distance list_distinct list_dot_product
        list_element list_entropy list_extract list_filter list_first list_grade_up list_has
        list_has_all list_has_any list_histogram list_indexof list_inner_product list_intersect
        list_kurtosis list_kurtosis_pop list_last list_mad list_max list_median list_min
        list_mode list_negative_dot_product list_negative_inner_product list_pack list_position
        list_prepend list_product list_reduce list_resize list_reverse list_reverse_sort
        list_select list_sem list_skewness list_slice list_sort list_stddev_pop list_stddev_samp
        list_string_agg list_sum list_transform list_unique list_value list_var_pop
        list_var_samp list_where list_zip map map_concat map_contains map_contains_entry
        map_contains_value map_entries map_extract map_extract_value map_from_entries map_keys
        map_values range reduce remap_struct row struct_concat struct_contains struct_extract
        struct_extract_at struct_has struct_indexof struct_insert struct_pack struct_position
        struct_update union_extract union_tag union_value variant_extract variant_typeof
        unnest
        """
    ),
    "JSON": _names(
        """
        from_json from_json_strict json json_array json_array_length json_contains json_exists
        json_extract json_extract_path json_extract_path_text json_extract_string
        json_group_array json_group_object json_group_structure json_keys json_merge_patch
        json_object json_pretty json_quote json_structure json_transform json_transform_strict
        json_type json_valid json_value row_to_json to_json
        """
    ),
    "regular expressions": _names(
        """
        regexp_escape regexp_extract regexp_extract_all regexp_full_match regexp_matches
        regexp_replace regexp_split_to_array regexp_split_to_table
        """
    ),
    "hashing and encoding": _names(
        """
        base64 bin bit_count bit_length bit_position bitstring create_sort_key decode encode
        from_base64 from_binary from_hex get_bit hash hex md5 md5_number md5_number_lower
        md5_number_upper octet_length set_bit sha1 sha256 to_base to_base64 to_binary to_hex
        unbin unhex url_decode url_encode xor
        """
    ),
    "dates, times and intervals": _names(
        """
        age century current_date current_localtime current_localtimestamp date_add date_diff
        date_part date_sub date_trunc datediff datepart datesub datetrunc day dayname dayofmonth
        dayofweek dayofyear decade epoch epoch_ms epoch_ns epoch_us era get_current_time
        get_current_timestamp hour isodow isoyear julian last_day make_date make_time
        make_timestamp make_timestamp_ms make_timestamp_ns make_timestamptz microsecond
        millennium millisecond minute month monthname nanosecond normalized_interval now quarter
        second strftime strptime time_bucket timezone timezone_hour timezone_minute to_centuries
        to_days to_decades to_hours to_microseconds to_millennia to_milliseconds to_minutes
        to_months to_quarters to_seconds to_timestamp to_weeks to_years today
        transaction_timestamp try_strptime week weekday weekofyear year yearweek
        """
    ),
    "text similarity": _names(
        """
        damerau_levenshtein editdist3 hamming jaccard jaro_similarity jaro_winkler_similarity
        levenshtein mismatches
        """
    ),
    "strings": _names(
        """
        ascii bar char_length character_length chr concat concat_ws contains ends_with format
        format_bytes ilike_escape instr lcase left left_grapheme length length_grapheme
        like_escape lower lpad ltrim nfc_normalize not_ilike_escape not_like_escape ord position
        prefix printf repeat replace reverse right right_grapheme rpad rtrim split split_part
        starts_with str_split str_split_regex string_split string_split_regex string_to_array
        strip_accents strlen strpos substr substring substring_grapheme suffix translate trim
        ucase unicode upper
        """
    ),
    "math": _names(
        """
        abs acos acosh add asin asinh atan atan2 atanh cbrt ceil ceiling cos cosh cot degrees
        divide equi_width_bins even exp factorial fdiv floor fmod gamma gcd greatest
        greatest_common_divisor is_histogram_other_bin isfinite isinf isnan lcm least
        least_common_multiple lgamma ln log log10 log2 mod multiply nextafter pi pow power
        radians random round round_even roundbankers sign signbit sin sinh sqrt subtract tan
        tanh trunc
        """
    ),
    "conditionals, types and identifiers": _names(
        """
        can_cast_implicitly cast_to_type gen_random_uuid geomean geometric_mean nullif
        replace_type typeof uuid uuid_extract_timestamp uuid_extract_version uuidv4 uuidv7 wavg
        weighted_avg
        """
    ),
    "window functions": _names(
        """
        cume_dist dense_rank first_value lag last_value lead nth_value ntile percent_rank rank
        row_number
        """
    ),
    "operators": _names(
        """
        !__postfix !~~ !~~* % & && * ** + - ->> / // <-> << <=> <@ >> @ @> ^ ^@ | || ~ ~~ ~~*
        ~~~
        """
    ),
}

#: Every allowed name.
ALLOWED_FUNCTIONS: frozenset[str] = frozenset().union(*FUNCTION_GROUPS.values())
